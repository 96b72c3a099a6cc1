"""Learning from less data: test error against training-set size, CapsNet against the paper's
MNIST baseline CNN, each trained with the same step budget on class-balanced subsets.

Every (model, size, seed) is one run: a class-balanced subset of the training digits (minus
the validation hold-out) drawn with that seed, trained with random 2-pixel shifts for the
same number of steps, the weights of its best validation accuracy tested. Small sets get
several seeds (``--seeds``), larger ones ``--seeds-large``; ``all`` is every training digit
left after the hold-out (not exactly balanced).
"""
import dataclasses
import json
import statistics
from pathlib import Path

import torch

from ..models import BaselineCNN, CapsNet
from ..train import prepare_images
from . import common

NAMES = {"capsnet": "CapsNet", "baseline": "baseline CNN"}
SMALL = 1000  # sizes up to this get --seeds runs, larger ones --seeds-large

# The MNIST baseline (35.4 M parameters, 100,352 inputs to its first layer of 328) diverges under
# Adam at CapsNet's 1e-3: its loss jumps from 2.3 to 6.2 at the second step and it then stays at
# chance. At 1e-4 it learns.
BASELINE_LR = 1e-4

PRESETS = {
    "cpu": dict(sizes="100,300,1000,3000,10000,all", seeds=2, seeds_large=1, steps=300, batch_size=32, eval_every=75,
                val_size=500, test_size=2000),
    "gpu": dict(sizes="100,300,1000,3000,10000,all", seeds=3, seeds_large=1, steps=2000, batch_size=128,
                eval_every=250, val_size=5000, test_size=10000),
    "smoke": dict(sizes="10,20", seeds=2, seeds_large=1, steps=2, batch_size=8, eval_every=1, val_size=20,
                  test_size=20),
}


def parse_sizes(text: str, available: int):
    sizes = []
    for part in text.split(","):
        if part == "all":
            sizes.append(available)
            continue
        if not part.isdigit() or int(part) < 10 or int(part) % 10 or int(part) > available:
            raise common.CommandError(f"--sizes must list multiples of 10 up to {available}, or all; got {part!r}")
        sizes.append(int(part))
    return sorted(set(sizes))


def main(argv=None) -> int:
    p = common.experiment_parser("data-efficiency", __doc__.splitlines()[0], PRESETS)
    p.add_argument("--sizes", help="comma-separated training-set sizes (multiples of 10) or all")
    p.add_argument("--seeds", type=int, help=f"seeds (subsets and initialisations) per size up to {SMALL}")
    p.add_argument("--seeds-large", type=int, help=f"seeds per size above {SMALL}")
    p.add_argument("--test-size", type=int, help="test on the first N MNIST test digits")
    args = common.finish_parsing(p, argv, PRESETS)
    say = common.reporter(args)

    (train_x, train_y), (val_x, val_y), (test_x, test_y) = common.load_mnist_splits(args, args.val_size)
    sizes = parse_sizes(args.sizes, len(train_y))
    val = prepare_images(val_x, None, 0, None)
    test_x, test_y = test_x[: args.test_size], test_y[: args.test_size]
    test = prepare_images(test_x, None, 0, None)
    budget = common.Budget(steps=args.steps, batch_size=args.batch_size, eval_every=args.eval_every)

    results = []
    for size in sizes:
        seeds = args.seeds if size <= SMALL else args.seeds_large
        for seed in range(args.seed, args.seed + seeds):
            if size == len(train_y):
                subset = torch.arange(size)
            else:
                try:
                    subset = common.balanced_subset(train_y, size, seed)
                except ValueError as exc:
                    raise common.CommandError(f"--sizes {size}: {exc}") from exc
            x_pool, y_pool = train_x[subset], train_y[subset]
            for name in args.models:
                torch.manual_seed(seed)
                model = (CapsNet(backend=args.backend) if name == "capsnet" else BaselineCNN()).to(args.device)

                def train_step(model, step, x_pool=x_pool, y_pool=y_pool, seed=seed):
                    idx = common.batch_indices(len(y_pool), args.batch_size, seed, step)
                    x = prepare_images(x_pool[idx], None, 2, common.step_generator(seed, step, salt=2))
                    return common.classification_loss(model, x.to(args.device), y_pool[idx].to(args.device))

                config = dict(experiment="data-efficiency", model=name, size=size, val_size=args.val_size,
                              backend=args.backend)
                model_budget = dataclasses.replace(budget, lr=BASELINE_LR) if name == "baseline" else budget
                result = common.train_run(
                    args.out_dir / f"{name}-{size}-seed{seed}", model, train_step,
                    lambda m: common.accuracy(m, val, val_y, args.device),
                    lambda m: dict(test_accuracy=common.accuracy(m, test, test_y, args.device)),
                    model_budget, seed, config, args.device, log=say, weights_needed=False)
                results.append(dict(model=name, size=size, seed=seed, **{k: result[k] for k in (
                    "test_accuracy", "val_accuracy", "best_step", "steps", "train_seconds")}))

    summary = summarise(results)
    machine = common.machine_line(args.device)
    header = ["training images", "seeds"] + [f"{NAMES[m]} test error" for m in args.models]
    rows = []
    for size in sizes:
        cells = [summary[(m, size)] for m in args.models]
        rows.append([f"{size:,}", cells[0]["runs"]] + [f"{c['mean']:.2f}% ± {c['std']:.2f}" for c in cells])
    table = common.markdown_table(header, rows)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "table.md").write_text(table)
    (args.out_dir / "results.json").write_text(json.dumps(dict(
        machine=machine, budget=vars(budget), test_size=len(test_y), runs=results), indent=1) + "\n")
    plot = error_plot(summary, args.models, sizes, args.out_dir / "data_efficiency.png", budget, len(test_y))
    print(table + f"\n(test error in %, mean ± standard deviation over seeds; {len(test_y)} test digits; "
          f"{budget.steps} steps of {budget.batch_size})\nmachine: {machine}\nwrote {args.out_dir / 'table.md'}, {plot}")
    return 0


def summarise(results):
    """(model, size) -> mean and standard deviation (over seeds) of the test error in %."""
    groups = {}
    for r in results:
        groups.setdefault((r["model"], r["size"]), []).append(100 * (1 - r["test_accuracy"]))
    return {key: dict(mean=statistics.fmean(errors), std=statistics.stdev(errors) if len(errors) > 1 else 0.0,
                      runs=len(errors)) for key, errors in groups.items()}


def error_plot(summary, models, sizes, path: Path, budget, test_size: int) -> Path:
    from ..figures import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in models:
        points = [summary[(name, s)] for s in sizes]
        ax.errorbar(sizes, [p["mean"] for p in points], yerr=[p["std"] for p in points], marker="o", capsize=3,
                    label=NAMES[name])
    ax.set(xscale="log", yscale="log", xlabel="training images (class-balanced)", ylabel="test error (%)",
           title=f"same budget: {budget.steps} steps of {budget.batch_size}; {test_size} test digits")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
