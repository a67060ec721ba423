"""Random augmentation of windowed slices: the order lives here, the strengths in `data.augment`.

The steps are the ones the papers and the strongest RSNA solutions used: horizontal flip,
rotation with a small stretch, Gaussian blur, brightness/contrast. Every step works on any
number of channels (windows x context slices) at once, so all channels move together.

build_augmentation runs in the loader workers on each uint8 slice (albumentations, OpenCV);
DeviceAugmentation runs the same steps on whole float batches on the GPU, for when the CPU cores
cannot keep up (`data.augment_on=gpu`).
"""

import math
from dataclasses import dataclass

import albumentations as A
import cv2
import numpy as np
import torch
import torch.nn.functional as F


def build_augmentation(
    hflip: float = 0.5,
    rotate: float = 15.0,
    scale: float = 0.1,
    affine_p: float = 0.5,
    blur_p: float = 0.2,
    blur_sigma: tuple[float, float] = (0.3, 1.2),
    brightness_contrast: float = 0.1,
    brightness_contrast_p: float = 0.3,
) -> A.Compose:
    """A pipeline for HxWxC uint8 windowed images; a strength of 0 leaves its step out."""
    steps: list[A.BasicTransform] = []
    if hflip > 0:
        steps.append(A.HorizontalFlip(p=hflip))
    if affine_p > 0 and (rotate > 0 or scale > 0):
        stretch = (1.0 - scale, 1.0 + scale)
        steps.append(
            A.Affine(
                rotate=(-rotate, rotate),
                scale={"x": stretch, "y": stretch},  # each axis on its own: a stretch, as the papers did
                interpolation=cv2.INTER_LINEAR,
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,  # air is 0 in every window
                p=affine_p,
            )
        )
    if blur_p > 0:
        steps.append(A.GaussianBlur(blur_limit=0, sigma_limit=tuple(blur_sigma), p=blur_p))
    if brightness_contrast_p > 0 and brightness_contrast > 0:
        steps.append(
            A.RandomBrightnessContrast(
                brightness_limit=brightness_contrast,
                contrast_limit=brightness_contrast,
                p=brightness_contrast_p,
            )
        )
    return A.Compose(steps)


def augmentation_for(on: str, strengths: dict):
    """The training augmentation with `strengths` (the data.augment keys) for the loader workers (cpu)
    or for the device (gpu)."""
    return DeviceAugmentation(**strengths) if on == "gpu" else build_augmentation(**strengths)


# Per slice, what DeviceAugmentation.draw picks and .apply does; the identity is (0, 0, 1, 1, 0, 1, 0).
PARAMS = ("flip", "angle", "stretch_x", "stretch_y", "blur_sigma", "contrast", "brightness")
_IDENTITY = np.array([0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0], dtype=np.float32)


@dataclass(frozen=True)
class DeviceAugmentation:
    """The steps and strengths of build_augmentation, run on whole batches where they are (`data.augment_on=gpu`).

    The dataset draws each slice's parameters on the CPU (a few numbers, seeded by (seed, epoch, slice)
    as the CPU pipeline is) and the batch carries them; `apply` does the pixel work on the GPU after
    the copy (ich.data.ondevice), so a loader worker only reads (and windows). The draws are its own:
    a run augmented on the GPU does not see the very images a CPU-augmented run sees, only the same
    distribution of them.
    """

    hflip: float = 0.5
    rotate: float = 15.0
    scale: float = 0.1
    affine_p: float = 0.5
    blur_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.3, 1.2)
    brightness_contrast: float = 0.1
    brightness_contrast_p: float = 0.3

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        """One slice's parameters, in PARAMS order; a strength of 0 leaves its step out, as on the CPU."""
        # One call for every number: a slice costs microseconds here, and this runs per slice in the workers.
        coin = rng.random(4)
        angle, stretch_x, stretch_y, sigma, contrast, brightness = 2 * rng.random(6) - 1  # each in [-1, 1)
        params = _IDENTITY.copy()
        params[0] = self.hflip > 0 and coin[0] < self.hflip
        if self.affine_p > 0 and (self.rotate > 0 or self.scale > 0) and coin[1] < self.affine_p:
            params[1:4] = self.rotate * angle, 1.0 + self.scale * stretch_x, 1.0 + self.scale * stretch_y
        if self.blur_p > 0 and coin[2] < self.blur_p:
            low, high = self.blur_sigma
            params[4] = low + (high - low) * (sigma + 1) / 2
        if self.brightness_contrast_p > 0 and self.brightness_contrast > 0 and coin[3] < self.brightness_contrast_p:
            params[5:7] = 1.0 + self.brightness_contrast * contrast, self.brightness_contrast * brightness
        return params

    @staticmethod
    def apply(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Augment float images [N, C, H, W] in [0, 1] by per-slice `params` [N, len(PARAMS)] (any device)."""
        params = params.detach().cpu().float()  # the masks are decided here, without waiting on the GPU
        flip, angle, stretch_x, stretch_y, sigma, contrast, brightness = params.unbind(1)
        out = images.clone()
        picked = _rows(flip > 0)
        if picked is not None:
            out[picked] = out[picked].flip(-1)
        picked = _rows((angle != 0) | (stretch_x != 1) | (stretch_y != 1))
        if picked is not None:
            out[picked] = _warp(out[picked], angle[picked], stretch_x[picked], stretch_y[picked])
        picked = _rows(sigma > 0)
        if picked is not None:
            out[picked] = _blur(out[picked], sigma[picked])
        picked = _rows((contrast != 1) | (brightness != 0))
        if picked is not None:
            scale = contrast[picked].to(out.device)[:, None, None, None]
            shift = brightness[picked].to(out.device)[:, None, None, None]  # by the maximum, 1: as albumentations does
            out[picked] = (out[picked] * scale + shift).clamp_(0.0, 1.0)
        return out


def _rows(mask: torch.Tensor) -> torch.Tensor | None:
    return mask.nonzero().flatten() if bool(mask.any()) else None


def _warp(images: torch.Tensor, degrees: torch.Tensor, stretch_x: torch.Tensor, stretch_y: torch.Tensor) -> torch.Tensor:
    """Rotate about the centre and stretch each axis; outside the slice is 0 (air in every window)."""
    radians = torch.deg2rad(degrees)
    cos, sin = torch.cos(radians), torch.sin(radians)
    # grid_sample looks up each output pixel in the input: the inverse of rotate-after-stretch. Slices
    # are square, so the [-1, 1] coordinates it works in have the same scale along both axes.
    theta = torch.stack([
        torch.stack([cos / stretch_x, sin / stretch_x, torch.zeros_like(cos)], dim=1),
        torch.stack([-sin / stretch_y, cos / stretch_y, torch.zeros_like(cos)], dim=1),
    ], dim=1).to(images.device, images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A Gaussian blur of its own sigma per slice, separable, edges mirrored as OpenCV does by default."""
    n, channels, height, width = images.shape
    radius = max(1, math.ceil(3 * float(sigma.max())))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    weights = torch.exp(-(offsets[None] ** 2) / (2 * sigma[:, None] ** 2))
    weights = (weights / weights.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)
    weights = weights.to(images.device, images.dtype)
    planes = images.reshape(1, n * channels, height, width)  # one group per (slice, channel)
    planes = F.conv2d(F.pad(planes, (radius, radius, 0, 0), mode="reflect"), weights[:, None, None, :], groups=n * channels)
    planes = F.conv2d(F.pad(planes, (0, 0, radius, radius), mode="reflect"), weights[:, None, :, None], groups=n * channels)
    return planes.reshape(n, channels, height, width)
