"""Batch augmentation: a random translation (zero-pad, then crop) and a random flip per image.

Why not torchvision.transforms.v2 directly: a v2 transform called on a batched tensor draws ONE
random parameter set for the whole batch (every image shifted the same way), and calling it per
image costs a Python loop. Here each image gets its own offset and flip from a few tensor ops.
Measured (2-core CPU, 1 torch thread, 128 images of 1x28x28, mean of 2000 calls): shift=2
0.27 ms per batch, shift=2 + hflip 0.41 ms, hflip alone 0.12 ms. (Advanced indexing of the padded
batch with four broadcast index tensors took 1.1 ms; unfold + one index is 4x faster.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workbench.config import AugmentConfig


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """x (B, C, H, W) -> a new tensor, each image shifted by up to cfg.shift pixels, maybe flipped.

    Returns `x` itself when there is nothing to do (shift = 0 and no hflip). Random numbers come
    from `generator` only (on its own device), so one seed gives one sequence of batches.
    """
    s = cfg.shift  # pixels
    if s == 0 and not cfg.hflip:
        return x
    b, _, h, w = x.shape
    if s > 0:
        # 1) per-image crop offsets into the padded image, 0..2s (s = not moved); unfold gives a
        #    (B, C, 2s+1, 2s+1, H, W) view of every crop, and one index picks each image's own
        offsets = torch.randint(0, 2 * s + 1, (2, b), generator=generator, device=generator.device)
        oy, ox = offsets.to(x.device)
        crops = F.pad(x, (s, s, s, s)).unfold(2, h, 1).unfold(3, w, 1)
        x = crops[torch.arange(b, device=x.device), :, oy, ox]  # (B, C, H, W), a copy
    if cfg.hflip:
        # 2) per-image flips, each with probability 1/2
        flip = torch.rand(b, generator=generator, device=generator.device) < 0.5
        x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
    return x
