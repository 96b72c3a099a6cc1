"""Build script.

Everything declarative lives in pyproject.toml. This file exists for the
C++/CUDA extension, which must compile against the torch that is installed:
build with `pip install --no-build-isolation .` so that torch is visible here.
"""
from setuptools import setup

setup()
