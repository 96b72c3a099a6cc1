"""Evaluate trained checkpoints: ``python -m capsrouting.evaluate CHECKPOINT [CHECKPOINT ...]``.

* Test error on MNIST (on the expanded, centered canvas when the model was trained on one).
* ``--affine``: the paper's affine-robustness experiment. Accuracy on an affNIST-like
  test set generated deterministically from the MNIST test images (``affine_test_set``),
  next to the expanded-MNIST accuracy, one row per checkpoint (CapsNet vs baseline).
* ``--pictures DIR`` (CapsNet with a decoder): ``reconstructions.png``, test inputs over
  their reconstructions, and ``perturbations.png``, the paper's Fig. 4: each of the 16
  dimensions of the winning capsule moved over [-0.25, 0.25] in steps of 0.05, decoded.

Checkpoints are loaded with ``weights_only=True``.
"""
import math
import sys
from pathlib import Path

import torch
from torch import nn

from . import figures
from ._cli import CommandError, OneLineParser, load_checkpoint_file, load_split, run
from .train import accuracy, build_model, prepare_images

# affNIST-like transforms, per test image, drawn uniformly from these ranges (after the digit
# is centered on the canvas): rotation in degrees, horizontal shear factor, scale per axis,
# and translation in pixels per axis, which keeps a 28 x 28 digit on a 40 x 40 canvas.
AFFINE_RANGES = dict(rotation_degrees=(-20.0, 20.0), shear=(-0.2, 0.2), scale=(0.8, 1.2), translation_pixels=(-6.0, 6.0))


def affine_parameters(n: int, seed: int = 0) -> dict:
    """n draws of the transform's parameters, uniform within AFFINE_RANGES (float64 tensors of n)."""
    g = torch.Generator().manual_seed(seed)

    def uniform(low_high):
        low, high = low_high
        return low + (high - low) * torch.rand(n, generator=g, dtype=torch.float64)

    params = dict(rotation_degrees=uniform(AFFINE_RANGES["rotation_degrees"]), shear=uniform(AFFINE_RANGES["shear"]))
    params["scale_x"], params["scale_y"] = uniform(AFFINE_RANGES["scale"]), uniform(AFFINE_RANGES["scale"])
    params["translation_x"] = uniform(AFFINE_RANGES["translation_pixels"])
    params["translation_y"] = uniform(AFFINE_RANGES["translation_pixels"])
    return params


def apply_affine(x: torch.Tensor, params: dict) -> torch.Tensor:
    """Each image of x (N, 1, S, S) under its own map: scale, then shear, then rotate about the
    center, then translate (pixels); bilinear resampling, zeros outside."""
    n, size = x.shape[0], x.shape[-1]
    angle = params["rotation_degrees"] * math.pi / 180
    cos, sin = torch.cos(angle), torch.sin(angle)
    zero, one = torch.zeros(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    shearing = torch.stack([torch.stack([one, params["shear"]], -1), torch.stack([zero, one], -1)], -2)
    scaling = torch.diag_embed(torch.stack([params["scale_x"], params["scale_y"]], -1))
    forward = rotation @ shearing @ scaling  # image -> transformed image, in normalised coordinates
    shift = torch.stack([params["translation_x"], params["translation_y"]], -1) * 2 / size
    # affine_grid maps output coordinates to input ones: the inverse map.
    inverse = torch.linalg.inv(forward)
    theta = torch.cat([inverse, -(inverse @ shift.unsqueeze(-1))], -1).float()
    grid = nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def affine_test_set(images_uint8: torch.Tensor, canvas: int = 40, seed: int = 0) -> torch.Tensor:
    """The MNIST test images, centered on the canvas, each under its own random affine map (seeded)."""
    x = prepare_images(images_uint8, canvas, 0, None)  # (N, 1, S, S), centered
    return apply_affine(x, affine_parameters(x.shape[0], seed))


def load_checkpoint(path, device):
    state = load_checkpoint_file(path, device)
    config = {"amp": "off", **state["config"]}  # checkpoints from before --amp trained in float32
    model = build_model(config).to(device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CommandError(f"{path}: weights do not fit the model its config describes: {str(exc).splitlines()[0]}") from exc
    return model.eval(), config


@torch.no_grad()
def pictures(model, config, images: torch.Tensor, out_dir: Path, count: int = 8) -> list:
    """Reconstructions of ``count`` images and the perturbation figure of the first three."""
    if config["model"] != "capsnet" or model.decoder is None:
        raise ValueError("pictures need a CapsNet trained with its reconstruction decoder")
    out_dir.mkdir(parents=True, exist_ok=True)
    return [figures.reconstructions(model, images[:count], out_dir / "reconstructions.png"),
            figures.perturbations(model, images[:3], out_dir / "perturbations.png")]


def main(argv=None) -> int:
    return run(_main, argv, prog="python -m capsrouting.evaluate")


def _main(argv=None) -> int:
    p = OneLineParser(prog="python -m capsrouting.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="*", type=Path)
    p.add_argument("--curves", type=Path, default=None, metavar="RUN_DIR",
                   help="draw loss, validation and test error per epoch from RUN_DIR/log.jsonl to RUN_DIR/curves.png")
    p.add_argument("--data-dir", default=None, help="MNIST IDX files (default: $CAPSROUTING_DATA)")
    p.add_argument("--download", action="store_true", help="fetch MNIST into the cache when it is not in --data-dir")
    p.add_argument("--affine", action="store_true", help="also the affNIST-like test set (canvas-trained models)")
    p.add_argument("--affine-seed", type=int, default=0)
    p.add_argument("--pictures", type=Path, default=None, help="write reconstruction and perturbation PNGs here")
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if not args.checkpoints and args.curves is None:
        p.error("give one or more checkpoints, or --curves RUN_DIR")
    if args.curves is not None:
        try:
            print(f"wrote {figures.training_curves(args.curves, args.curves / 'curves.png')}")
        except (FileNotFoundError, ValueError) as exc:
            raise CommandError(str(exc)) from exc
        if not args.checkpoints:
            return 0

    images, labels = load_split(args.data_dir, "test", args.download)
    if args.test_subset:
        images, labels = images[: args.test_subset], labels[: args.test_subset]
    header = "| checkpoint | model | MNIST test set | accuracy | test error |" + (" affNIST-like accuracy |" if args.affine else "")
    print(header)
    print("| --- " * (header.count("|") - 1) + "|")
    for path in args.checkpoints:
        model, config = load_checkpoint(path, args.device)
        canvas = config["canvas"]
        expanded = accuracy(model, config, prepare_images(images, canvas, 0, None), labels, args.device)
        row = f"| {path} | {config['model']} | {'expanded, %dx%d' % (canvas, canvas) if canvas else 'standard'} | " \
              f"{100 * expanded:.2f}% | {100 * (1 - expanded):.2f}% |"
        if args.affine:
            if not canvas:
                raise CommandError(f"{path}: the affine test set needs a model trained on a canvas (--canvas 40)")
            row += f" {100 * accuracy(model, config, affine_test_set(images, canvas, args.affine_seed), labels, args.device):.2f}% |"
        print(row)
        if args.pictures is not None and config["model"] == "capsnet" and model.decoder is not None:
            written = pictures(model, config, prepare_images(images, canvas, 0, None), args.pictures / Path(path).stem)
            print("wrote " + ", ".join(str(w) for w in written), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
