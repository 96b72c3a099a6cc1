"""What the command-line tools share: one-line errors with exit status 2, and the data and
checkpoint loading whose failures a user can fix (missing files, a bad flag, a corrupt file)."""
import argparse
import sys
from pathlib import Path

import torch

from . import data


class CommandError(Exception):
    """A problem the user can fix; the tool prints it on one line and exits with status 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is answered with one line (no usage block) and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def run(main, argv=None, prog: str = "capsrouting") -> int:
    """``main(argv)``, with a CommandError turned into one line on stderr and exit status 2."""
    try:
        return main(argv)
    except CommandError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2


def check_device(parser: argparse.ArgumentParser, text: str) -> torch.device:
    """The torch device named by --device, or the parser's one-line error."""
    try:
        device = torch.device(text)
    except RuntimeError:
        parser.error(f"--device must be a torch device such as cpu or cuda, got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    return device


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


def load_split(data_dir, split: str, download: bool):
    """MNIST images and labels, or a CommandError saying what is missing and how to get it."""
    try:
        return data.load_mnist(data_dir, split, download=download)
    except FileNotFoundError as exc:
        try:
            where = f"in {data.resolve_data_dir(data_dir)}"
        except FileNotFoundError:
            where = "(no --data-dir given and CAPSROUTING_DATA is unset)"
        raise CommandError(
            f"MNIST files not found {where}: pass --download to fetch them into the cache "
            f"(CAPSROUTING_CACHE, default ~/.cache/capsrouting/mnist), or --data-dir DIR holding the IDX files"
        ) from exc
    except data.MNISTError as exc:
        raise CommandError(f"bad MNIST file: {_one_line(exc)}") from exc
    except OSError as exc:  # download failures
        raise CommandError(f"could not get MNIST: {_one_line(exc)}") from exc


def load_checkpoint_file(path: Path, device) -> dict:
    """A checkpoint written by capsrouting.train, or a CommandError naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise CommandError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or not ours
        raise CommandError(f"cannot read checkpoint {path}: {type(exc).__name__}: {_one_line(exc)[:300]}") from exc
    missing = [key for key in ("model", "config", "epoch") if not isinstance(state, dict) or key not in state]
    if missing:
        raise CommandError(f"{path} is not a capsrouting.train checkpoint (missing {', '.join(missing)})")
    return state
