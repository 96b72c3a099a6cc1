"""Input checks shared by every backend, so all of them reject bad input alike."""
import torch

SUPPORTED_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_DTYPE_NAMES = "float64, float32, float16 or bfloat16"


def _check_tensor(name: str, t, rank: int, layout: str, leading: bool = False) -> None:
    """t a tensor of a supported dtype with ``rank`` dims (at least ``rank`` with ``leading`` dims)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(t).__name__}")
    if t.dim() < rank if leading else t.dim() != rank:
        dims = f"at least {rank}" if leading else f"{rank}"
        raise ValueError(f"{name} must have shape {layout} ({dims} dims), got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must have dtype {_DTYPE_NAMES}, got {t.dtype}")


def _check_nonempty(name: str, t: torch.Tensor, layout: str, dims) -> None:
    # The leading (batch) dims may be 0; the capsule counts and sizes may not.
    for d in dims:
        if t.shape[d] == 0:
            raise ValueError(
                f"{name} must have shape {layout} with every dimension but the batch >= 1, "
                f"got shape {tuple(t.shape)}"
            )


def check_num_iterations(num_iterations) -> None:
    if isinstance(num_iterations, bool) or not isinstance(num_iterations, int):
        raise TypeError(f"num_iterations must be an int >= 1, got {num_iterations!r}")
    if num_iterations < 1:
        raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")


def check_capsule_routing_args(u, W, num_iterations, leading_dims: bool = True) -> None:
    """u (..., I, Din) and W (I, J, Dout, Din): same dtype and device, matching I and Din.
    Without ``leading_dims`` (a backend's op) u must be (B, I, Din)."""
    layout = "(..., I, Din)" if leading_dims else "(B, I, Din)"
    _check_tensor("u", u, 2 if leading_dims else 3, layout, leading=leading_dims)
    _check_tensor("W", W, 4, "(I, J, Dout, Din)")
    _check_nonempty("u", u, layout, (-2, -1))
    _check_nonempty("W", W, "(I, J, Dout, Din)", (0, 1, 2, 3))
    if u.shape[-2] != W.shape[0]:
        raise ValueError(
            f"W must have shape (I, J, Dout, Din) with I = u.shape[-2] = {u.shape[-2]}, "
            f"got W of shape {tuple(W.shape)}"
        )
    if u.shape[-1] != W.shape[3]:
        raise ValueError(
            f"W must have shape (I, J, Dout, Din) with Din = u.shape[-1] = {u.shape[-1]}, "
            f"got W of shape {tuple(W.shape)}"
        )
    if u.dtype != W.dtype:
        raise TypeError(f"u and W must have the same dtype, got u {u.dtype} and W {W.dtype}")
    if u.device != W.device:
        raise ValueError(f"u and W must be on the same device, got u on {u.device} and W on {W.device}")
    check_num_iterations(num_iterations)


def check_route_args(u_hat, num_iterations, leading_dims: bool = True) -> None:
    """u_hat (..., I, J, D); without ``leading_dims`` (a backend's op), (B, I, J, D)."""
    layout = "(..., I, J, D)" if leading_dims else "(B, I, J, D)"
    _check_tensor("u_hat", u_hat, 3 if leading_dims else 4, layout, leading=leading_dims)
    _check_nonempty("u_hat", u_hat, layout, (-3, -2, -1))
    check_num_iterations(num_iterations)


def check_routing_options(x, I, J, D, bias, logit_prior, leaky, detach_inner, return_couplings) -> None:
    """The options of DESIGN.md §6 for input x (u or u_hat) of I inputs routed to J capsules of D dims:
    ``bias`` (J, D) and ``logit_prior`` (I, J) None or tensors of x's dtype and device, the rest bools."""
    for name, t, shape, layout in (("bias", bias, (J, D), "(J, Dout)"), ("logit_prior", logit_prior, (I, J), "(I, J)")):
        if t is None:
            continue
        _check_tensor(name, t, 2, layout)
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {layout} = {shape}, got shape {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} must have the dtype of the routed input, {x.dtype}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on the device of the routed input, {x.device}, got {t.device}")
    for name, flag in (("leaky", leaky), ("detach_inner", detach_inner), ("return_couplings", return_couplings)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")


def check_squash_args(s, dim) -> None:
    if not isinstance(s, torch.Tensor):
        raise TypeError(f"s must be a torch.Tensor, got {type(s).__name__}")
    if not s.is_floating_point():
        raise TypeError(f"s must have a floating-point dtype, got {s.dtype}")
    if s.dim() == 0:
        raise ValueError("s must have at least one dimension, got a 0-dim tensor")
    if not -s.dim() <= dim < s.dim():
        raise ValueError(f"dim must be in [{-s.dim()}, {s.dim() - 1}] for s of shape {tuple(s.shape)}, got {dim}")


def check_labels(labels, batch_size: int, num_classes: int, allow_sets: bool = False) -> None:
    """labels must be an int64 tensor of shape (batch_size,) with values in [0, num_classes);
    with ``allow_sets`` also (batch_size, L), L distinct classes per row (several digits per image)."""
    layout = "(B,) or (B, L)" if allow_sets else "(B,)"
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor of shape {layout}, got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must have dtype torch.int64, got {labels.dtype}")
    dims_ok = labels.dim() == 1 or (allow_sets and labels.dim() == 2 and 1 <= labels.shape[1] <= num_classes)
    if not dims_ok or labels.shape[0] != batch_size:
        raise ValueError(f"labels must have shape {layout} with B = {batch_size}, got shape {tuple(labels.shape)}")
    if labels.dim() == 2 and labels.numel() and not torch.compiler.is_compiling():
        ordered = labels.sort(dim=1).values
        if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
            raise ValueError("labels of shape (B, L) must hold L different classes in every row")
    # The value check reads the data back: skipped while torch.compile traces (it would break the graph).
    if labels.numel() and not torch.compiler.is_compiling() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got values in [{int(labels.min())}, {int(labels.max())}]"
        )
