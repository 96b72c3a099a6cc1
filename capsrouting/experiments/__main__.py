"""``python -m capsrouting.experiments NAME [options]``: run one of the paper's experiments."""
import importlib
import sys

from .._cli import run
from . import EXPERIMENTS


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.splitlines()[0] + "\n\nexperiments: " + ", ".join(EXPERIMENTS))
        return 0 if argv else 2
    name = argv[0]
    if name not in EXPERIMENTS:
        print(f"python -m capsrouting.experiments: error: unknown experiment {name!r}; choose one of "
              f"{', '.join(EXPERIMENTS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(EXPERIMENTS[name])
    return run(module.main, argv[1:], prog=f"python -m capsrouting.experiments {name}")


if __name__ == "__main__":
    sys.exit(main())
