"""capsrouting: fused dynamic routing between capsules (Sabour, Frosst & Hinton, 2017)."""
from . import torch_backend as _torch_backend  # noqa: F401  (registers backend "torch")
from . import triton_backend as _triton_backend  # noqa: F401  (registers backend "triton")
from . import ext_backend as _ext_backend  # noqa: F401  (registers backends "cpu" and "cuda")
from .backends import available_backends
from .functional import capsule_routing, route, squash
from .layer import CapsuleLayer

__version__ = "0.1.0"

__all__ = ["capsule_routing", "route", "squash", "CapsuleLayer", "available_backends", "__version__"]
