"""Affine robustness (paper §5.2): train on MNIST digits placed at random on a 40 x 40 canvas,
test on the expanded (centered) MNIST test set and on affinely transformed digits.

Both models train until their validation accuracy (held-out training digits, centered)
reaches ``--target`` (the paper stopped at 99.23% and 99.22%) or the step budget runs out.
The affine test set is ``capsrouting.evaluate``'s affNIST-like set (rotation within 20
degrees, shear within 0.2, scale 0.8-1.2, translation, as in affNIST), and also the real
affNIST test files when ``--affnist-dir`` is given.
"""
import json
from pathlib import Path

import torch

from ..evaluate import affine_test_set
from ..models import AffineBaselineCNN, CapsNet
from ..train import prepare_images
from . import common
from .affnist import AffNISTError, read_affnist

CANVAS = 40
PAPER = {"capsnet": dict(expanded=99.23, affnist=79.0), "baseline": dict(expanded=99.22, affnist=66.0)}
NAMES = {"capsnet": "CapsNet (3 iterations, reconstruction)", "baseline": "CNN baseline (pooling, dropout)"}

PRESETS = {
    "cpu": dict(steps=1200, batch_size=128, eval_every=200, val_size=2000, test_size=10000, affnist_limit=10000),
    "gpu": dict(steps=6000, batch_size=128, eval_every=500, val_size=5000, test_size=10000, affnist_limit=320000),
    "smoke": dict(steps=2, batch_size=8, eval_every=1, val_size=20, test_size=20, affnist_limit=20),
}


def build(name: str, backend: str):
    return CapsNet(input_size=CANVAS, backend=backend) if name == "capsnet" else AffineBaselineCNN(input_size=CANVAS)


def main(argv=None) -> int:
    p = common.experiment_parser("affine", __doc__.splitlines()[0], PRESETS)
    p.add_argument("--target", type=float, default=0.992, help="stop once validation accuracy reaches this")
    p.add_argument("--test-size", type=int, help="test on the first N MNIST test digits")
    p.add_argument("--affnist-dir", type=Path, default=None, help="the affNIST test .mat files, when you have them")
    p.add_argument("--affnist-limit", type=int, help="use the first N real affNIST test images")
    args = common.finish_parsing(p, argv, PRESETS)
    if not 0 < args.target <= 1:
        p.error(f"--target must be an accuracy in (0, 1], got {args.target}")
    say = common.reporter(args)

    (train_x, train_y), (val_x, val_y), (test_x, test_y) = common.load_mnist_splits(args, args.val_size)
    test_x, test_y = test_x[: args.test_size], test_y[: args.test_size]
    val = prepare_images(val_x, CANVAS, 0, None)
    expanded = prepare_images(test_x, CANVAS, 0, None)
    affine = affine_test_set(test_x, CANVAS, seed=0)
    real = None
    if args.affnist_dir is not None:
        try:
            real_x, real_y = read_affnist(args.affnist_dir, args.affnist_limit)
        except (FileNotFoundError, AffNISTError, ImportError) as exc:
            raise common.CommandError(str(exc)) from exc
        real = (real_x.unsqueeze(1).float().div_(255.0), real_y)

    budget = common.Budget(steps=args.steps, batch_size=args.batch_size, eval_every=args.eval_every,
                           target_accuracy=args.target)
    results, predictions = {}, {}
    for name in args.models:
        torch.manual_seed(args.seed)
        model = build(name, args.backend).to(args.device)

        def train_step(model, step):
            idx = common.batch_indices(len(train_y), args.batch_size, args.seed, step)
            x = prepare_images(train_x[idx], CANVAS, 0, common.step_generator(args.seed, step, salt=2))
            return common.classification_loss(model, x.to(args.device), train_y[idx].to(args.device))

        def test(model):
            metrics = dict(expanded_accuracy=common.accuracy(model, expanded, test_y, args.device),
                           affine_accuracy=common.accuracy(model, affine, test_y, args.device))
            if real is not None:
                metrics["affnist_accuracy"] = common.accuracy(model, real[0], real[1], args.device)
            return metrics

        config = dict(experiment="affine", model=name, canvas=CANVAS, val_size=args.val_size, backend=args.backend)
        results[name] = common.train_run(
            args.out_dir / name, model, train_step, lambda m: common.accuracy(m, val, val_y, args.device), test,
            budget, args.seed, config, args.device, log=say)
        predictions[name] = common.scores(model, affine[:8], args.device).argmax(1)

    machine = common.machine_line(args.device)
    table = affine_table(results, real is not None)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "table.md").write_text(table)
    (args.out_dir / "results.json").write_text(json.dumps(dict(machine=machine, results=results), indent=1) + "\n")
    picture = prediction_picture(affine[:8], test_y[:8], predictions, args.out_dir / "affine_predictions.png")
    print(table + f"\nmachine: {machine}\nwrote {args.out_dir / 'table.md'}, {picture}")
    return 0


def affine_table(results: dict, with_real: bool) -> str:
    header = ["model", "parameters", "steps (stopped by)", "validation", "expanded MNIST", "affNIST-like"]
    header += ["affNIST"] if with_real else []
    header += ["paper: expanded MNIST", "paper: affNIST"]
    rows = []
    for name, r in results.items():
        stop = "target" if r["reached_target"] else "budget"
        row = [NAMES[name], f"{r['parameters'] / 1e6:.1f} M", f"{r['steps']} ({stop})", f"{100 * r['val_accuracy']:.2f}%",
               f"{100 * r['expanded_accuracy']:.2f}%", f"{100 * r['affine_accuracy']:.2f}%"]
        row += [f"{100 * r['affnist_accuracy']:.2f}%"] if with_real else []
        row += [f"{PAPER[name]['expanded']:.2f}%", f"{PAPER[name]['affnist']:.0f}%"]
        rows.append(row)
    return common.markdown_table(header, rows)


def prediction_picture(images: torch.Tensor, labels: torch.Tensor, predictions: dict, path: Path) -> Path:
    """The affine test digits, each titled with every model's prediction (red where wrong)."""
    from ..figures import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(images), figsize=(1.6 * len(images), 2.3), squeeze=False)
    for n, ax in enumerate(axes[0]):
        ax.imshow(images[n, 0].numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"digit {int(labels[n])}", fontsize=8)
        lines = [(name, int(pred[n])) for name, pred in predictions.items()]
        for k, (name, guess) in enumerate(lines):
            ax.text(0.5, -0.12 - 0.14 * k, f"{'CapsNet' if name == 'capsnet' else 'CNN'}: {guess}",
                    transform=ax.transAxes, ha="center", va="top", fontsize=8,
                    color="black" if guess == int(labels[n]) else "red")
    fig.savefig(path, dpi=120, bbox_inches="tight")  # "tight" keeps the prediction lines below the axes
    plt.close(fig)
    return path
