"""What the loader workers may leave for the GPU: windowing (`data.window_on=gpu`) and augmentation
(`data.augment_on=gpu`).

A batch says itself what is left: with `windows` ([N, W, 2] centre and width per window) its images
are int16 HU, one channel per slice of the stack; with `augment` ([N, 7]) each slice's augmentation
parameters come along. ICHLitModule.on_after_batch_transfer calls `finish_batch` after every copy to
the device, so fitting, testing and prediction see the same float images in [0, 1] whichever data
module or DataLoader made the batch; code that feeds a model without Lightning calls it itself.
"""

import torch

from ich.data.augment import DeviceAugmentation
from ich.data.windows import to_unit_float


def finish_batch(batch: dict) -> dict:
    """Window and augment what the batch still needs, where it is; a batch needing nothing is returned as it is."""
    windows = batch.pop("windows", None)
    if windows is not None:
        batch["image"] = window_hu(batch["image"], windows[0])
    params = batch.pop("augment", None)
    if params is not None:
        batch["image"] = DeviceAugmentation.apply(to_unit_float(batch["image"]), params)
    return batch


def window_hu(hu: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """int16 HU [N, S, H, W] (S slices of a stack) -> float32 [N, S x W, H, W] in [0, 1], windows within each slice.

    The channels come in the order the CPU path gives them, and one channel becomes three for ImageNet
    stems, as there. The values are exact, not the CPU path's 256 levels: they differ by < 0.5/255.
    """
    windows = windows.to(hu.device, torch.float32)
    low = (windows[:, 0] - windows[:, 1] / 2)[None, None, :, None, None]
    width = windows[:, 1][None, None, :, None, None]
    images = ((hu.float()[:, :, None] - low) / width).clamp_(0.0, 1.0).flatten(1, 2)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images.contiguous(memory_format=torch.channels_last)
