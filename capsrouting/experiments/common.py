"""What the experiments share: a step-budget trainer that checkpoints, resumes and selects on
validation; data helpers; and the tables and machine line their results are reported with.

A *run* is one model trained once, in its own directory:

* ``state.pt``: everything needed to go on (weights, optimizer, step, validation history),
  written atomically at every evaluation; a command started again resumes from it.
* ``best.pt``: the weights of the evaluation with the highest validation accuracy (model
  selection never looks at the test set).
* ``log.jsonl``: one line per evaluation.
* ``result.json``: written once the run is finished and its best weights tested; a finished
  run is never trained again, so an interrupted experiment restarts where it stopped.

Every random draw of step ``t`` (batch, augmentation, dropout) comes from generators seeded
by ``(seed, t)``, so a resumed run takes exactly the steps an uninterrupted one would.
"""
import json
import os
import time
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
from torch import nn

from .._cli import CommandError, OneLineParser, check_device, load_split
from ..info import cpu_name
from ..losses import capsnet_loss
from ..models import CapsNet
from ..train import save_atomically

_SEED_STRIDE = 1_000_003


@dataclass
class Budget:
    """How long a run trains: at most ``steps`` steps of ``batch_size``, evaluated every
    ``eval_every`` steps (and at the last), stopping early once validation accuracy reaches
    ``target_accuracy``. Adam, lr ``lr`` times ``lr_decay`` every ``decay_steps`` steps (the
    official CapsNet code's schedule: 1e-3, 0.96 per 2000 steps)."""

    steps: int
    batch_size: int
    eval_every: int
    target_accuracy: Optional[float] = None
    lr: float = 1e-3
    lr_decay: float = 0.96
    decay_steps: int = 2000


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    """The seed of one step's draws (salt separates independent streams of a step)."""
    return (seed * _SEED_STRIDE + step) * 7 + salt


def step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(step_seed(seed, step, salt))


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """The examples of step ``step``: epochs of a seeded shuffle of range(n), ``batch_size`` at a time
    (a last partial batch of an epoch is dropped; a set smaller than a batch is repeated)."""
    if n < batch_size:
        return torch.randint(n, (batch_size,), generator=step_generator(seed, step, salt=3))
    per_epoch = n // batch_size
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(step_seed(seed, epoch, salt=4)))
    return order[position * batch_size:(position + 1) * batch_size]


def _load(path: Path, device) -> dict:
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise CommandError(f"cannot read {path} ({type(exc).__name__}): delete it to start that run again") from exc


def train_run(
    run_dir: Path,
    model: nn.Module,
    train_step: Callable[[nn.Module, int], torch.Tensor],
    validate: Callable[[nn.Module], float],
    test: Callable[[nn.Module], Dict[str, float]],
    budget: Budget,
    seed: int,
    config: dict,
    device,
    log: Callable[[str], None] = print,
    weights_needed: bool = True,
) -> dict:
    """Train ``model`` (already on ``device``) under ``budget``, or resume or reuse the run in
    ``run_dir``; returns its result with the best weights loaded into ``model``.

    ``weights_needed=False``: the caller reads only the result, so a finished run whose
    ``result.json`` was kept without its checkpoints (a record carried to another machine) is
    reused as it is, and ``model`` is left untouched.

    ``train_step(model, step)`` returns the loss of step ``step`` (drawing its batch from
    :func:`step_generator`); ``validate(model)`` the validation accuracy and ``test(model)``
    a dict of test metrics, both called in eval mode under ``torch.no_grad``. ``config``
    (JSON-able) describes the run: a directory written with another config is refused.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {**config, "budget": asdict(budget), "seed": seed}
    result_path, state_path, best_path = run_dir / "result.json", run_dir / "state.pt", run_dir / "best.pt"
    if result_path.exists():
        result = json.loads(result_path.read_text())
        if result["config"] != config:
            raise CommandError(f"{run_dir} holds a run with other settings: use another --out-dir or delete it")
        if best_path.exists():
            model.load_state_dict(_load(best_path, device)["model"])
        elif weights_needed:
            raise CommandError(f"{run_dir} holds a finished result without its best weights (best.pt), "
                               "which this command needs: delete result.json to train it again")
        log(f"{run_dir.name}: finished before, reusing its result")
        return result

    optimizer = torch.optim.Adam(model.parameters(), lr=budget.lr)
    step, history, seconds, best = 0, [], 0.0, None
    if state_path.exists():
        state = _load(state_path, device)
        if state["config"] != config:
            raise CommandError(f"{state_path} was written by a run with other settings: use another --out-dir or delete it")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, history, seconds = state["step"], state["history"], state["seconds"]
        best = max(history, key=lambda h: h["val_accuracy"]) if history else None
        log(f"{run_dir.name}: resuming at step {step}")

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            accuracy = float(validate(model))
        model.train()
        return accuracy

    reached = best is not None and budget.target_accuracy is not None and best["val_accuracy"] >= budget.target_accuracy
    model.train()
    started = time.perf_counter()
    with (run_dir / "log.jsonl").open("a") as log_file:
        while step < budget.steps and not reached:
            for group in optimizer.param_groups:
                group["lr"] = budget.lr * budget.lr_decay ** (step / budget.decay_steps)
            torch.manual_seed(step_seed(seed, step, salt=1))  # dropout
            loss = train_step(model, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step % budget.eval_every and step != budget.steps:
                continue
            accuracy = evaluate()
            seconds += time.perf_counter() - started
            started = time.perf_counter()
            record = dict(step=step, loss=float(loss.detach()), val_accuracy=accuracy, seconds=round(seconds, 1))
            history.append(record)
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            if best is None or accuracy > best["val_accuracy"]:
                best = record
                save_atomically(dict(model=model.state_dict(), step=step, val_accuracy=accuracy), best_path)
            save_atomically(dict(model=model.state_dict(), optimizer=optimizer.state_dict(), step=step, history=history,
                       seconds=seconds, config=config), state_path)
            reached = budget.target_accuracy is not None and accuracy >= budget.target_accuracy
            log(f"{run_dir.name}: step {step}/{budget.steps}, loss {record['loss']:.4f}, "
                f"validation accuracy {100 * accuracy:.2f}%, {seconds:.0f} s")

    model.load_state_dict(_load(best_path, device)["model"])
    model.eval()
    with torch.no_grad():
        metrics = test(model)
    result = dict(config=config, steps=step, best_step=best["step"], val_accuracy=best["val_accuracy"],
                  reached_target=reached, train_seconds=round(seconds, 1),
                  images_per_second=round(step * budget.batch_size / max(seconds, 1e-9), 1),
                  parameters=parameter_count(model), **metrics)
    result_path.write_text(json.dumps(result, indent=1) + "\n")
    os.remove(state_path)  # the optimizer state is large and no longer needed; best.pt stays
    return result


def classification_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A CapsNet's margin + reconstruction loss, or a CNN's cross-entropy, of one batch."""
    out = model(x, y) if isinstance(model, CapsNet) else model(x)
    if isinstance(model, CapsNet):
        return capsnet_loss(out, x, y)
    return nn.functional.cross_entropy(out, y)


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device) -> float:
    """Fraction of float images (N, 1, S, S) whose top score is their label."""
    return float((scores(model, images, device).argmax(1) == labels).float().mean()) if len(labels) else 0.0


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def scores(model: nn.Module, images: torch.Tensor, device, batch_size: int = 250) -> torch.Tensor:
    """Class scores (N, K) on the CPU, in batches: capsule lengths of a CapsNet, logits of a CNN."""
    out = []
    for start in range(0, images.shape[0], batch_size):
        result = model(images[start:start + batch_size].to(device))
        out.append((result.lengths if hasattr(result, "lengths") else result).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


def balanced_subset(labels: torch.Tensor, size: int, seed: int, num_classes: int = 10) -> torch.Tensor:
    """Indices of ``size`` examples, ``size / num_classes`` of each class, drawn at random (seeded)."""
    if size % num_classes:
        raise ValueError(f"a class-balanced subset needs a multiple of {num_classes} examples, got {size}")
    per_class = size // num_classes
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for k in range(num_classes):
        members = (labels == k).nonzero().flatten()
        if len(members) < per_class:
            raise ValueError(f"class {k} has {len(members)} examples, fewer than the {per_class} asked for")
        chosen.append(members[torch.randperm(len(members), generator=g)[:per_class]])
    return torch.cat(chosen).sort().values


def load_mnist_splits(args, val_size: int):
    """(train, validation, test) as (uint8 images, labels) pairs; validation is the last
    ``val_size`` training images, never trained on."""
    train_images, train_labels = load_split(args.data_dir, "train", args.download)
    test_images, test_labels = load_split(args.data_dir, "test", args.download)
    if not 0 < val_size < len(train_labels):
        raise CommandError(f"--val-size must be in [1, {len(train_labels) - 1}], got {val_size}")
    split = len(train_labels) - val_size
    return ((train_images[:split], train_labels[:split]), (train_images[split:], train_labels[split:]),
            (test_images, test_labels))


def machine_line(device) -> str:
    """Which machine a result was measured on, for the tables."""
    device = torch.device(device)
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = f"{cpu_name()}, {torch.get_num_threads()} threads"
    return f"{what}; torch {torch.__version__}; {date.today().isoformat()}"


def markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def experiment_parser(name: str, description: str, presets: Dict[str, dict]) -> OneLineParser:
    """The options every experiment takes (--models parses to a list); each adds its own and a ``presets``
    table of defaults."""
    p = OneLineParser(prog=f"python -m capsrouting.experiments {name}", description=description)
    p.add_argument("--preset", choices=sorted(presets), default="cpu",
                   help="default sizes: cpu (this project's 2-core machine, hours), gpu (one H100, minutes), "
                        "smoke (seconds, for tests); the options below override them")
    p.add_argument("--out-dir", type=Path, default=Path("runs") / name, help="runs, tables and pictures")
    p.add_argument("--data-dir", default=None, help="MNIST IDX files (default: $CAPSROUTING_DATA)")
    p.add_argument("--download", action="store_true", help="fetch MNIST into the cache when it is not in --data-dir")
    p.add_argument("--backend", default="auto", help="routing backend: auto, torch, cpu, cuda, triton")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--models", default="capsnet,baseline", help="comma-separated: capsnet, baseline")
    p.add_argument("--steps", type=int, help="step budget of every run")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--eval-every", type=int, help="steps between validations")
    p.add_argument("--val-size", type=int, help="held-out training digits for validation")
    return p


def finish_parsing(p: OneLineParser, argv, presets: Dict[str, dict]):
    """Parse, fill unset options from the chosen preset, and check the common ones."""
    args = p.parse_args(argv)
    for key, value in presets[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    for key, value in vars(args).items():
        if isinstance(value, int) and not isinstance(value, bool) and key not in ("seed",) and value < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1, got {value}")
    check_device(p, args.device)
    models = [m for m in args.models.split(",") if m]
    if not models or any(m not in ("capsnet", "baseline") for m in models):
        p.error(f"--models must list capsnet and/or baseline, got {args.models!r}")
    args.models = models
    return args


def reporter(args) -> Callable[[str], None]:
    import sys

    return (lambda text: None) if args.quiet else (lambda text: print(text, file=sys.stderr, flush=True))
