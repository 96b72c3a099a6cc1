"""The pictures of a trained run: reconstructions, the paper's capsule-dimension perturbation
figure (Fig. 4), and training curves from ``log.jsonl``. Needs matplotlib."""
import json
from pathlib import Path

import torch

# The paper's Fig. 4: each dimension of the winning capsule moved over [-0.25, 0.25] by 0.05.
PERTURBATION_OFFSETS = [round(-0.25 + 0.05 * k, 2) for k in range(11)]


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("the pictures need matplotlib: pip install matplotlib (or capsrouting[train])") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _tile(rows) -> torch.Tensor:
    """rows: list of lists of (S, S) images -> one (rows*S, cols*S) image, clamped to [0, 1]."""
    return torch.cat([torch.cat([img.clamp(0, 1) for img in row], dim=1) for row in rows], dim=0).float().cpu()


@torch.no_grad()
def reconstructions(model, images: torch.Tensor, path: Path) -> Path:
    """Test inputs (top row) over the decoder's reconstructions from their predicted capsule."""
    x = images.to(next(model.parameters()).device)
    size = x.shape[-1]
    recon = model(x).reconstructions.view(-1, size, size)
    _pyplot().imsave(path, _tile([[img[0] for img in x], list(recon)]).numpy(), cmap="gray", vmin=0.0, vmax=1.0)
    return path


@torch.no_grad()
def perturbations(model, images: torch.Tensor, path: Path) -> Path:
    """One panel per digit: row d is the reconstruction with dimension d of the winning capsule
    moved by each offset (columns), as in the paper's Fig. 4."""
    plt = _pyplot()
    device = next(model.parameters()).device
    x = images.to(device)
    out = model(x)
    size = x.shape[-1]
    steps = torch.tensor(PERTURBATION_OFFSETS, device=device, dtype=out.digit_caps.dtype)
    fig, axes = plt.subplots(1, len(x), figsize=(4.2 * len(x), 6.4), squeeze=False)
    for n, ax in enumerate(axes[0]):
        v, winner = out.digit_caps[n], int(out.lengths[n].argmax())
        mask = torch.zeros(1, v.shape[0], 1, device=device, dtype=v.dtype)
        mask[0, winner] = 1
        rows = []
        for d in range(v.shape[-1]):
            moved = v.expand(len(steps), -1, -1).clone()
            moved[:, winner, d] += steps
            rows.append(list(model.decoder((moved * mask).flatten(1)).view(-1, size, size)))
        ax.imshow(_tile(rows).numpy(), cmap="gray", vmin=0.0, vmax=1.0)
        ax.set_title(f"digit {winner}")
        ax.set_xticks([size * (k + 0.5) for k in range(len(steps))], [f"{o:+.2f}" for o in PERTURBATION_OFFSETS],
                      rotation=90, fontsize=6)
        ax.set_yticks([size * (d + 0.5) for d in range(v.shape[-1])], [f"dim {d + 1}" for d in range(v.shape[-1])],
                      fontsize=6)
        ax.set_xlabel("offset added to the dimension", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def read_log(run_dir: Path) -> list:
    """The per-epoch records of a run's log.jsonl (other events skipped)."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a capsrouting.train run directory")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if "epoch" in r]


def training_curves(run_dir: Path, path: Path) -> Path:
    """Training loss, validation and test error per epoch, from RUN_DIR/log.jsonl, to one PNG."""
    plt = _pyplot()
    records = read_log(run_dir)
    if not records:
        raise ValueError(f"{Path(run_dir) / 'log.jsonl'} holds no finished epoch yet")
    epochs = [r["epoch"] for r in records]
    fig, (loss_ax, error_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    loss_ax.plot(epochs, [r["train_loss"] for r in records], marker="o")
    loss_ax.set(xlabel="epoch", ylabel="training loss", yscale="log", title="loss")
    for key, label in (("val_error", "validation"), ("test_error", "test")):
        points = [(r["epoch"], 100 * r[key]) for r in records if r.get(key) is not None]
        if points:
            error_ax.plot(*zip(*points), marker="o", label=label)
    error_ax.set(xlabel="epoch", ylabel="error (%)", title="error (best.pt: lowest validation)")
    error_ax.legend()
    from matplotlib.ticker import MaxNLocator

    for ax in (loss_ax, error_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
