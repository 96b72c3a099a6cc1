"""Images per second of a full CapsNet training step: forward, margin + reconstruction loss, backward, Adam.

What the routing op buys end to end: the convolutions and the decoder are the same for
every backend; only the digit-capsule routing changes. "compiled" is the eager
reference with the model compiled by ``torch.compile``.
"""
import contextlib
import time
from typing import Callable, Optional

import torch

from capsrouting.losses import capsnet_loss
from capsrouting.models import CapsNet


def make_training_step(backend: str, device: str, batch: int, compile_backend: str = "inductor",
                       amp: Optional[torch.dtype] = None) -> Callable[[], None]:
    """One optimizer step on a fixed random batch of 28 x 28 images.

    compile_backend: what "compiled" compiles with ("aot_eager" skips code generation, for quick checks).
    amp: autocast dtype of the forward and loss (as ``train --amp``), or None for float32; float16
    steps go through a gradient scaler, as training does.
    """
    torch.manual_seed(0)
    model = CapsNet(backend="torch" if backend in ("reference", "compiled") else backend).to(device)
    forward = torch.compile(model, backend=compile_backend) if backend == "compiled" else model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images = torch.rand(batch, 1, 28, 28, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)

    scaler = torch.amp.GradScaler(device, enabled=amp == torch.float16)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=amp) if amp is not None else contextlib.nullcontext():
            loss = capsnet_loss(forward(images, labels), images, labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if device == "cuda":
            torch.cuda.synchronize()

    return step


def training_images_per_second(backend: str, device: str, batch: int, steps: int, warmup: int = 1,
                               compile_backend: str = "inductor", amp: Optional[torch.dtype] = None) -> float:
    step = make_training_step(backend, device, batch, compile_backend, amp)
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - start)
