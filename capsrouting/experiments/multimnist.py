"""Overlapping digits (paper §6, MultiMNIST): CapsNet against the paper's baseline CNN.

Training pairs come from the training digits minus a held-out validation set, validation
pairs from the held-out digits, test pairs from the MNIST test set, each split with its own
seed (see :mod:`capsrouting.multimnist`). An image counts as right only if both of its digits
are the model's two highest scores (capsule lengths, or the baseline's logits).

CapsNet (36 x 36 input) trains with the margin loss with both labels present, plus the
reconstruction loss of each digit decoded from its own capsule alone and compared with that
digit's shifted image; the baseline with sigmoid cross-entropy.
"""
import json
import math
from pathlib import Path

import torch

from ..losses import capsnet_loss, multilabel_cross_entropy
from ..models import CapsNet, MultiMNISTBaselineCNN
from ..multimnist import SIDE, MultiMNIST, both_right, bounding_box_overlap
from . import common

PAPER_ERROR = {"capsnet": 5.2, "baseline": 8.1}
NAMES = {"capsnet": "CapsNet (3 iterations, reconstruction)", "baseline": "CNN baseline (paper §6)"}

PRESETS = {
    "cpu": dict(steps=1000, batch_size=64, eval_every=200, val_size=1000, pairs_per_image=4, test_pairs=5000),
    "gpu": dict(steps=10000, batch_size=128, eval_every=1000, val_size=5000, pairs_per_image=100, test_pairs=100000),
    "smoke": dict(steps=2, batch_size=8, eval_every=1, val_size=20, pairs_per_image=1, test_pairs=20),
}


def as_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255.0)


def main(argv=None) -> int:
    p = common.experiment_parser("multimnist", __doc__.splitlines()[0], PRESETS)
    p.add_argument("--pairs-per-image", type=int, help="training pairs per training digit (the paper: 1000)")
    p.add_argument("--test-pairs", type=int, help="test pairs (as many per test digit as needed)")
    args = common.finish_parsing(p, argv, PRESETS)
    say = common.reporter(args)

    (train_x, train_y), (val_x, val_y), (test_x, test_y) = common.load_mnist_splits(args, args.val_size)
    train = MultiMNIST(train_x, train_y, args.pairs_per_image, seed=args.seed)
    val = MultiMNIST(val_x, val_y, 1, seed=args.seed + 1).batch(torch.arange(len(val_y)))
    test_set = MultiMNIST(test_x, test_y, math.ceil(args.test_pairs / len(test_y)), seed=args.seed + 2)
    # Every k-th pair, so that the test pairs spread over all test digits.
    test = test_set.batch(torch.linspace(0, len(test_set) - 1, args.test_pairs).round().long().unique())
    overlap = bounding_box_overlap(test.singles)

    def both_right_rate(model, pairs) -> float:
        return float(both_right(common.scores(model, as_float(pairs.images).unsqueeze(1), args.device),
                                pairs.labels).float().mean())

    budget = common.Budget(steps=args.steps, batch_size=args.batch_size, eval_every=args.eval_every)
    results, trained = {}, {}
    for name in args.models:
        torch.manual_seed(args.seed)
        model = (CapsNet(input_size=SIDE, backend=args.backend) if name == "capsnet"
                 else MultiMNISTBaselineCNN(input_size=SIDE)).to(args.device)

        def train_step(model, step):
            pairs = train.batch(common.batch_indices(len(train), args.batch_size, args.seed, step))
            x, y = as_float(pairs.images).unsqueeze(1).to(args.device), pairs.labels.to(args.device)
            if isinstance(model, CapsNet):
                return capsnet_loss(model(x, y), as_float(pairs.singles).to(args.device), y)
            return multilabel_cross_entropy(model(x), y)

        config = dict(experiment="multimnist", model=name, val_size=args.val_size,
                      pairs_per_image=args.pairs_per_image, backend=args.backend)
        results[name] = common.train_run(
            args.out_dir / name, model, train_step, lambda m: both_right_rate(m, val),
            lambda m: dict(test_both_right=both_right_rate(m, test), test_pairs=len(test.labels)),
            budget, args.seed, config, args.device, log=say)
        trained[name] = model

    machine = common.machine_line(args.device)
    header = ["model", "parameters", "steps", "validation error", "test error", "paper: test error"]
    rows = [[NAMES[name], f"{r['parameters'] / 1e6:.2f} M", r["steps"], f"{100 * (1 - r['val_accuracy']):.2f}%",
             f"{100 * (1 - r['test_both_right']):.2f}%", f"{PAPER_ERROR[name]}%"] for name, r in results.items()]
    table = common.markdown_table(header, rows)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "table.md").write_text(table)
    summary = dict(machine=machine, results=results, test_pairs=len(test.labels), bounding_box_overlap=overlap)
    (args.out_dir / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    pictures = []
    if "capsnet" in trained:
        pictures.append(reconstruction_picture(trained["capsnet"], test, args.out_dir / "multimnist_reconstructions.png",
                                               args.device))
    print(table + f"\ntest pairs: {len(test.labels)}; bounding boxes of the two digits: mean IoU "
          f"{100 * overlap['iou']:.0f}%, mean intersection over the smaller box {100 * overlap['over_smaller']:.0f}%"
          f"\nmachine: {machine}\nwrote {args.out_dir / 'table.md'}" + "".join(f", {p}" for p in pictures))
    return 0


@torch.no_grad()
def reconstruction_picture(model: CapsNet, pairs, path: Path, device, count: int = 8) -> Path:
    """The paper's Fig. 5: each input (top) over the reconstructions of the two longest capsules,
    the first in red and the second in green, titled with labels (L) and predictions (R)."""
    from ..figures import _pyplot

    plt = _pyplot()
    model.eval()
    x = as_float(pairs.images[:count]).unsqueeze(1).to(device)
    out = model(x, pairs.labels[:count].to(device))  # eval mode: the two longest capsules, longest first
    predicted = out.lengths.topk(2, dim=1).indices.cpu()
    recon = out.reconstructions.float().cpu().view(-1, 2, SIDE, SIDE).clamp(0, 1)
    fig, axes = plt.subplots(2, len(x), figsize=(1.5 * len(x), 3.4), squeeze=False)
    for n in range(len(x)):
        axes[0, n].imshow(x[n, 0].cpu().numpy(), cmap="gray", vmin=0, vmax=1)
        colour = torch.stack([recon[n, 0], recon[n, 1], torch.zeros(SIDE, SIDE)], dim=-1)
        axes[1, n].imshow(colour.numpy())
        axes[0, n].set_title(f"L:({int(pairs.labels[n, 0])},{int(pairs.labels[n, 1])})", fontsize=8)
        axes[1, n].set_title(f"R:({int(predicted[n, 0])},{int(predicted[n, 1])})", fontsize=8,
                             color="black" if bool(both_right(out.lengths[n:n + 1].cpu(), pairs.labels[n:n + 1]))
                             else "red")
        for ax in axes[:, n]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
