"""The floor for item 1: the plainest PyTorch training loop over in-memory tensors.

randperm, index a batch, forward, cross-entropy, backward, optimizer step, scheduler step:
nothing else (no validation, no augmentation, no metrics, no callbacks). The optimizer (AdamW)
and schedule (one-cycle, 25 % warm-up) match workbench's defaults. `channels_last=True` (a
reference variant, not the floor) stores the model and each batch channels-last, as workbench
does, so the loop's own overhead can be told apart from the memory format's gain.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def bare_fit(
    model: nn.Module,
    x: torch.Tensor,  # (N, C, H, W) float32 in [0, 1]
    y: torch.Tensor,  # (N,) int64
    *,
    epochs: int,
    batch_size: int,  # images per optimizer step
    lr: float,  # peak learning rate of the one-cycle schedule
    weight_decay: float,  # AdamW's decoupled weight decay
    generator: torch.Generator,
    channels_last: bool = False,
) -> int:
    """Train `model` in place; returns the number of images trained on (ragged batch dropped)."""
    steps = len(x) // batch_size  # optimizer steps per epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=epochs * steps, pct_start=0.25
    )
    if channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for step in range(steps):
            idx = order[step * batch_size : (step + 1) * batch_size]
            xb = x[idx].contiguous(memory_format=torch.channels_last) if channels_last else x[idx]
            loss = F.cross_entropy(model(xb), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return epochs * steps * batch_size
