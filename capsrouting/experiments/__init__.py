"""The paper's experiments, one command each: ``python -m capsrouting.experiments NAME [options]``.

* ``affine``: affine robustness (CapsNet against a CNN of similar size, trained on 40 x 40).
* ``data-efficiency``: test error against training-set size, CapsNet against the MNIST baseline.
* ``multimnist``: overlapping digits (MultiMNIST), CapsNet against the paper's baseline.

Every experiment trains its runs with :mod:`capsrouting.experiments.common` (resumable:
start the same command again to go on), writes ``table.md``, ``results.json`` and its
pictures to ``--out-dir``, and takes ``--preset cpu|gpu|smoke`` for its default sizes.
"""
EXPERIMENTS = {
    "affine": "capsrouting.experiments.affine",
    "data-efficiency": "capsrouting.experiments.data_efficiency",
    "multimnist": "capsrouting.experiments.multimnist",
}
