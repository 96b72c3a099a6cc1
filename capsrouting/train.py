"""Train the paper's CapsNet or its baseline CNN on MNIST: ``python -m capsrouting.train``.

Paper defaults (Sabour, Frosst & Hinton, 2017): Adam, lr 1e-3 decayed by a factor
every epoch, batch 128, random shifts of up to 2 pixels, margin loss + 0.0005 x
reconstruction loss. ``--canvas 40`` trains on digits placed at random on a 40 x 40
canvas (the paper's affNIST training set).

Reproducible and resumable: the model is initialised from ``--seed``; every epoch
draws its shuffle, its augmentation and its dropout from generators seeded by
(seed, epoch), so a run resumed from the checkpoint of epoch e (``--resume``) ends
with the same weights as one that never stopped. Checkpoints are written
atomically (temporary file, then rename) after every epoch: ``last.pt`` and
``best.pt``; a JSON line per epoch goes to ``log.jsonl``.

Model selection is honest: ``--val-size N`` (default 5000) holds out the last N
training images (centered, never augmented, never trained on). ``best.pt`` is the
epoch with the lowest validation error, and ``--patience P`` stops after P epochs
without a better one. The test error is logged every epoch but selects nothing.

``--amp bf16`` (or ``fp16`` on a GPU, with a gradient scaler) trains under
``torch.autocast``; ``--compile`` trains a ``torch.compile``d model;
``--download`` fetches MNIST; ``--tensorboard`` also writes TensorBoard scalars.

Scales out with torchrun: ``torchrun --nproc_per_node N -m capsrouting.train ...``
trains with DistributedDataParallel (gloo on CPU, NCCL on CUDA); each process takes
its share of every epoch's shuffle, and rank 0 writes the files.
"""
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from . import data
from ._cli import CommandError, OneLineParser, check_device, load_checkpoint_file, load_split, run
from .losses import capsnet_loss
from .models import BaselineCNN, CapsNet

_SEED_STRIDE = 1_000_003  # separates the per-epoch generators of different seeds


AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    p = OneLineParser(prog="python -m capsrouting.train", description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["capsnet", "baseline"], default="capsnet")
    p.add_argument("--iterations", type=int, default=3, help="routing iterations (CapsNet)")
    p.add_argument("--no-reconstruction", action="store_true", help="CapsNet without the decoder and its loss")
    p.add_argument("--routing-bias", action="store_true",
                   help="CapsNet's digit capsules learn a bias on s, as the official TensorFlow code does")
    p.add_argument("--backend", default="auto", help="routing backend: auto, torch, cpu, cuda, triton")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=128, help="per process")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-decay", type=float, default=0.96, help="learning rate factor per epoch")
    p.add_argument("--reconstruction-weight", type=float, default=0.0005)
    p.add_argument("--shift", type=int, default=2, help="random shift in pixels (MNIST training)")
    p.add_argument("--canvas", type=int, default=None, help="train on a random position of a CANVAS x CANVAS canvas")
    p.add_argument("--val-size", type=int, default=5000,
                   help="hold out the last N training images for model selection (0: none, and no best.pt)")
    p.add_argument("--patience", type=int, default=None, help="stop after this many epochs without a better validation error")
    p.add_argument("--train-subset", type=int, default=None, help="train on the first N training images (after the hold-out)")
    p.add_argument("--test-subset", type=int, default=None, help="evaluate on the first N test images")
    p.add_argument("--max-steps", type=int, default=None, help="stop every epoch after this many steps (smoke runs)")
    p.add_argument("--amp", choices=list(AMP_DTYPES), default="off",
                   help="autocast the forward and loss to bfloat16 or float16 (fp16: GPU only, with a gradient scaler)")
    p.add_argument("--compile", action="store_true", help="train a torch.compile'd model")
    p.add_argument("--data-dir", default=None, help="MNIST IDX files (default: $CAPSROUTING_DATA)")
    p.add_argument("--download", action="store_true", help="fetch MNIST into the cache when it is not in --data-dir")
    p.add_argument("--out-dir", default="runs/capsnet", help="checkpoints, log.jsonl")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard scalars to OUT_DIR/tensorboard")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/last.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "iterations"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.val_size < 0:
        p.error(f"--val-size must be >= 0, got {args.val_size}")
    if args.patience is not None and (args.patience < 1 or args.val_size == 0):
        p.error("--patience must be >= 1 and needs a validation set (--val-size > 0)")
    if args.canvas is not None and args.canvas < 28:
        p.error(f"--canvas must be >= 28 (the MNIST image size), got {args.canvas}")
    device = check_device(p, args.device)
    if args.amp == "fp16" and device.type != "cuda":
        p.error("--amp fp16 needs a CUDA device (on a CPU use --amp bf16)")
    return args


# What a resumed run must share with the run that wrote last.pt: everything that decides which
# images are trained on, in which order, and what the model and its loss are. (Defaults for
# checkpoints written before the option existed.)
RESUME_MUST_MATCH = dict(model=None, iterations=None, no_reconstruction=None, canvas=None, shift=None, seed=None,
                         batch_size=None, train_subset=None, max_steps=None, reconstruction_weight=None,
                         val_size=0, amp="off", routing_bias=False)


def check_resumable(saved: dict, config: dict, path: Path) -> None:
    """A CommandError naming the first option that differs from the checkpoint's run."""
    for key, default in RESUME_MUST_MATCH.items():
        before = saved.get(key, default)
        if before != config[key]:
            flag = "--" + key.replace("_", "-")
            raise CommandError(f"{path} was trained with {flag} {before}, this run asks for {config[key]}: "
                               f"resume with the same options, or start a new --out-dir")


def build_model(config: dict) -> nn.Module:
    size = config["canvas"] or 28
    if config["model"] == "baseline":
        return BaselineCNN(input_size=size)
    return CapsNet(input_size=size, num_iterations=config["iterations"],
                   reconstruction=not config["no_reconstruction"], backend=config["backend"],
                   routing_bias=config.get("routing_bias", False))


def prepare_images(images_uint8: torch.Tensor, canvas: Optional[int], shift: int, generator: Optional[torch.Generator]):
    """uint8 (B, 28, 28) -> float (B, 1, S, S): on the canvas (random place, or centered without a
    generator), else shifted at random by up to ``shift`` pixels (none without a generator)."""
    x = images_uint8.unsqueeze(1).float().div_(255.0)
    if canvas is not None:
        margin = canvas - 28
        x = nn.functional.pad(x, (margin // 2, margin - margin // 2, margin // 2, margin - margin // 2))
        # Centered, then shifted by up to margin/2: every position on the canvas (odd margins aside).
        return data.shift_batch(x, margin // 2, generator) if generator is not None else x
    return data.shift_batch(x, shift, generator) if generator is not None and shift > 0 else x


def loss_and_correct(model, config, images, labels):
    if config["model"] == "baseline":
        logits = model(images)
        return nn.functional.cross_entropy(logits, labels), (logits.argmax(1) == labels).sum()
    out = model(images, labels)
    loss = capsnet_loss(out, images, labels, reconstruction_weight=config["reconstruction_weight"])
    return loss, (out.lengths.argmax(1) == labels).sum()


def autocast_for(config: dict, device) -> contextlib.AbstractContextManager:
    """The precision the run trains (and evaluates) in: torch.autocast for --amp, else nothing."""
    dtype = AMP_DTYPES[config.get("amp", "off")]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


@torch.no_grad()
def accuracy(model, config, images: torch.Tensor, labels: torch.Tensor, device, batch_size: int = 500) -> float:
    """Fraction classified right; images float (N, 1, S, S), already prepared. The caller sets eval mode."""
    right = 0
    for start in range(0, len(labels), batch_size):
        x, y = images[start:start + batch_size].to(device), labels[start:start + batch_size].to(device)
        with autocast_for(config, device):
            scores = model(x) if config["model"] == "baseline" else model(x).lengths
        right += int((scores.argmax(1) == y).sum())
    return right / max(1, len(labels))


def error_rate(model, config, images, labels, device) -> float:
    """Error (fraction) on uint8 MNIST images, centered on the canvas when training used one."""
    model.eval()
    error = 1.0 - accuracy(model, config, prepare_images(images, config["canvas"], 0, None), labels, device)
    model.train()
    return error


def open_tensorboard(out_dir: Optional[Path]):
    """A SummaryWriter in OUT_DIR/tensorboard (None: only check that it can be made), or a
    CommandError saying what to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise CommandError(
            f"--tensorboard needs the tensorboard package ({exc}): pip install tensorboard, "
            "or install capsrouting with the [tensorboard] extra"
        ) from exc
    return SummaryWriter(log_dir=str(out_dir / "tensorboard")) if out_dir is not None else None


def save_atomically(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def parameter_checksum(model: nn.Module) -> torch.Tensor:
    """Bit-exact fingerprint of the weights, as 4 int64 numbers (for comparing replicas)."""
    import hashlib

    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    return torch.frombuffer(bytearray(digest.digest()), dtype=torch.int64).clone()


def main(argv=None) -> int:
    return run(_main, argv, prog="python -m capsrouting.train")


def _main(argv=None) -> int:
    args = parse_args(argv)
    config = vars(args)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = 0, 1
    device = torch.device(args.device)
    if args.tensorboard:
        open_tensorboard(None)  # on every rank, before any process group: a missing package stops all alike
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
    out_dir = Path(args.out_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)

    train_images, train_labels = load_split(args.data_dir, "train", args.download)
    test_images, test_labels = load_split(args.data_dir, "test", args.download)
    if args.val_size >= len(train_labels):
        raise CommandError(f"--val-size {args.val_size} leaves no training images out of {len(train_labels)}")
    # The hold-out is the end of the training set, taken before any subset: never trained on.
    split = len(train_labels) - args.val_size
    val_images, val_labels = train_images[split:], train_labels[split:]
    train_images, train_labels = train_images[:split], train_labels[:split]
    if args.train_subset:
        train_images, train_labels = train_images[: args.train_subset], train_labels[: args.train_subset]
    if args.test_subset:
        test_images, test_labels = test_images[: args.test_subset], test_labels[: args.test_subset]
    writer = open_tensorboard(out_dir) if args.tensorboard and rank == 0 else None

    torch.manual_seed(args.seed)
    model = build_model(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=args.lr_decay)
    # float16 gradients underflow without loss scaling; bfloat16 has float32's range.
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    start_epoch, best, since_best = 0, math.inf, 0
    if args.resume and (out_dir / "last.pt").exists():
        state = load_checkpoint_file(out_dir / "last.pt", device)
        check_resumable(state["config"], config, out_dir / "last.pt")
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if "scaler" in state:
                scaler.load_state_dict(state["scaler"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CommandError(f"{out_dir / 'last.pt'} does not fit this run's model and options: "
                               f"{str(exc).splitlines()[0]}") from exc
        start_epoch = state["epoch"] + 1
        best, since_best = state.get("best_val_error", math.inf), state.get("epochs_since_best", 0)
    trained = nn.parallel.DistributedDataParallel(model) if distributed else model
    if args.compile:
        trained = torch.compile(trained)

    steps_per_epoch = len(train_labels) // (args.batch_size * world)
    if args.max_steps:
        steps_per_epoch = min(steps_per_epoch, args.max_steps)
    if steps_per_epoch == 0:
        raise CommandError(f"the training set ({len(train_labels)} images) is smaller than one step of "
                           f"{args.batch_size} x {world} processes")
    log = (out_dir / "log.jsonl").open("a") if rank == 0 else None
    for epoch in range(start_epoch, args.epochs):
        stop = args.patience is not None and since_best >= args.patience
        if distributed:  # rank 0 alone evaluates; every rank must stop with it
            flag = torch.tensor([int(stop)], device=device if device.type == "cuda" else "cpu")
            dist.broadcast(flag, 0)
            stop = bool(flag.item())
        if stop:
            break
        # Everything random in this epoch comes from (seed, epoch): resuming repeats it exactly.
        epoch_seed = args.seed * _SEED_STRIDE + epoch
        order = torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(epoch_seed))
        augment = torch.Generator().manual_seed(epoch_seed + 1)
        torch.manual_seed(epoch_seed + 2)  # dropout
        started, total_loss, correct, seen, first_loss = time.perf_counter(), 0.0, 0, 0, None
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", disable=rank != 0 or args.no_progress,
                   leave=False, dynamic_ncols=True)
        for step in bar:
            # Every process draws the augmentation of the whole step, then keeps its own share.
            indices = order[step * world * args.batch_size:(step + 1) * world * args.batch_size]
            mine = slice(rank * args.batch_size, (rank + 1) * args.batch_size)
            x = prepare_images(train_images[indices], args.canvas, args.shift, augment)[mine].to(device)
            y = train_labels[indices][mine].to(device)
            with autocast_for(config, device):
                loss, hits = loss_and_correct(trained, config, x, y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            step_loss = loss.detach().item()
            first_loss = step_loss if first_loss is None else first_loss
            total_loss, correct, seen = total_loss + step_loss * len(y), correct + int(hits), seen + len(y)
            seconds = time.perf_counter() - started
            bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}", img_s=f"{seen * world / seconds:.0f}")
        seconds = time.perf_counter() - started
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        if rank != 0:
            continue
        val_error = error_rate(model, config, val_images, val_labels, device) if args.val_size else None
        test_error = error_rate(model, config, test_images, test_labels, device)
        improved = val_error is not None and val_error < best
        if improved:
            best, since_best = val_error, 0
        else:
            since_best += 1
        record = dict(epoch=epoch + 1, train_loss=total_loss / seen, first_step_loss=first_loss, last_step_loss=step_loss,
                      train_accuracy=correct / seen, val_error=val_error, test_error=test_error,
                      best_val_error=best if best < math.inf else None,
                      lr=lr, seconds=seconds, images_per_second=seen * world / seconds, amp=args.amp)
        log.write(json.dumps(record) + "\n")
        log.flush()
        if writer is not None:
            for name in ("train_loss", "train_accuracy", "val_error", "test_error", "lr", "images_per_second"):
                if record[name] is not None:
                    writer.add_scalar(name, record[name], epoch + 1)
            writer.flush()
        state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                     scaler=scaler.state_dict(), epoch=epoch, best_val_error=best, epochs_since_best=since_best,
                     config=config)
        save_atomically(state, out_dir / "last.pt")
        if improved:
            save_atomically(state, out_dir / "best.pt")
        val_text = f"validation error {100 * val_error:.2f}%, " if val_error is not None else ""
        tqdm.write(f"epoch {epoch + 1}: loss {record['train_loss']:.4f}, train accuracy {record['train_accuracy']:.4f}, "
                   f"{val_text}test error {100 * test_error:.2f}%, {record['images_per_second']:.0f} images/s",
                   file=sys.stderr)
    if distributed:
        # Tensors, not all_gather_object: a pickled object held by gloo's work can deadlock teardown.
        local = parameter_checksum(model)
        checksums = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(checksums, local)
        if rank == 0:
            hexes = [c.numpy().tobytes().hex()[:16] for c in checksums]
            log.write(json.dumps(dict(event="replicas", checksums=hexes, identical=len(set(hexes)) == 1)) + "\n")
        del trained  # the DDP reducer goes before its process group
        dist.barrier()
        dist.destroy_process_group()
    if log is not None:
        log.close()
    if writer is not None:
        writer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
