"""Augmentation of training batches: a fast batched shift/flip, torchvision v2 per image, MixUp.

Three steps, each only when the study file asks (`[data.augment]`, or any of its keys per model in
`params` / `space`, searchable like a [train] key), on training batches only:
1. Per image, torchvision.transforms.v2: random resized crop, rotation, colour jitter,
   TrivialAugment or RandAugment, then random erasing. A v2 transform called on a batch draws ONE
   parameter set for all of it, so these run in a loop over the images, drawing from torch's
   global generator (seeded per fold by workbench.runtime): ~0.45 ms per 32x32 RGB image for
   crop + flip + TrivialAugment + erasing, 1 thread here.
2. Batched: a random translation (zero-pad, then crop) and flips, each image its own draw, from
   a few tensor ops. Measured (2-core CPU, 1 torch thread, 128 images of 1x28x28, mean of 2000
   calls): shift=2 0.27 ms per batch, shift=2 + hflip 0.41 ms, hflip alone 0.12 ms; the same
   through v2 per image (RandomCrop(padding=2) + RandomHorizontalFlip) 8 ms. Kept for that.
   (Advanced indexing of the padded batch with four broadcast index tensors took 1.1 ms; unfold +
   one index is 4x faster.)
3. Per batch: MixUp or CutMix (v2's, one of them at random when both are on), whose soft
   targets the training loop's cross-entropy takes as they are.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from workbench.config import AugmentConfig

# the keys whose steps run through torchvision (steps 1 and 3); shift and hflip are batched
V2_KEYS = frozenset(AugmentConfig.model_fields) - {"shift", "hflip"}

if TYPE_CHECKING:  # torchvision is imported when a study asks for v2 steps: worker start-up
    from torchvision.transforms import v2


def per_image(cfg: AugmentConfig, size: tuple[int, int]) -> v2.Compose | None:
    """The v2 pipeline of step 1 for images of `size` (h, w); None when it would do nothing."""
    wanted = (cfg.crop_scale < 1, cfg.rotation, cfg.color_jitter, cfg.auto_augment != "none")
    if not any(wanted) and cfg.erasing == 0:
        return None  # and torchvision is not imported: 1.5 s and ~200 MB a process (dynamo)
    from torchvision.transforms import v2

    steps: list[v2.Transform] = []
    if cfg.crop_scale < 1.0:
        steps.append(v2.RandomResizedCrop(size, scale=(cfg.crop_scale, 1.0), antialias=True))
    if cfg.rotation > 0:
        steps.append(v2.RandomRotation(cfg.rotation, interpolation=v2.InterpolationMode.BILINEAR))
    if cfg.color_jitter > 0:
        c = cfg.color_jitter
        steps.append(v2.ColorJitter(brightness=c, contrast=c, saturation=c))
    if cfg.auto_augment == "trivial":
        steps.append(v2.TrivialAugmentWide())
    elif cfg.auto_augment == "rand":
        steps.append(v2.RandAugment())
    if cfg.erasing > 0:
        steps.append(v2.RandomErasing(p=cfg.erasing))
    return v2.Compose(steps)


def augment_batch(
    x: torch.Tensor,
    cfg: AugmentConfig,
    generator: torch.Generator,
    pipeline: v2.Compose | None = None,
) -> torch.Tensor:
    """x (B, C, H, W) in [0, 1] -> augmented: `pipeline` per image (step 1), then shift/flip.

    Returns `x` itself when there is nothing to do. Shift and flip draw from `generator` only
    (on its own device), so one seed gives one sequence of batches."""
    if pipeline is not None:
        x = torch.stack([pipeline(img) for img in x])
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


def batch_mixer(cfg: AugmentConfig, num_classes: int) -> v2.Transform | None:
    """Step 3: (images, labels) -> (mixed images, soft targets (B, classes)); None when off."""
    if cfg.mixup == 0 and cfg.cutmix == 0:
        return None
    from torchvision.transforms import v2

    mixers: list[v2.Transform] = []
    if cfg.mixup > 0:
        mixers.append(v2.MixUp(alpha=cfg.mixup, num_classes=num_classes))
    if cfg.cutmix > 0:
        mixers.append(v2.CutMix(alpha=cfg.cutmix, num_classes=num_classes))
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)
