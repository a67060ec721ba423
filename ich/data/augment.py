"""Random augmentation of slices: the order lives here, the strengths in `data.augment`.

The steps are the ones the papers and the strongest RSNA solutions used: horizontal flip,
rotation with a small stretch, Gaussian blur, brightness/contrast. Every step works on any
number of channels (windows x context slices) at once, so all channels move together.

It runs in the loader workers on each windowed uint8 slice (albumentations, OpenCV), seeded per
(seed, epoch, slice) by the dataset.

Site augmentation (`data.augment.site=true`, off by default) comes first: another scanner's look, on the HU of
each slice before it is windowed (window jitter, noise, reconstruction kernel, in-plane resolution), or on the
planes of a PNG/JPG folder that comes windowed (kernel, resolution, gamma and contrast).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import albumentations as A
import cv2
import numpy as np

from ich.data.windows import Window, window_planes

SITE_PREFIX = "site_"  # data.augment keys of the site augmentation: site_<field of SiteAugmentation>


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


@dataclass(frozen=True)
class SiteAugmentation:
    """Strengths of the site augmentation (data.augment.site_*): what another scanner changes in the same head.

    A draw (`draw`) is one scanner's look, shared by every slice of one item (its context neighbours come from
    the same scanner); only the noise differs from slice to slice. A strength of 0 (or a probability of 0) leaves
    its step out.
    """

    window_center: float = 10.0  # HU, +-: each window's centre moves by up to this
    window_width: float = 0.2  # +- this fraction of each window's width
    noise: tuple[float, float] = (0.0, 12.0)  # SD of Gaussian HU noise, drawn from this range
    kernel_p: float = 0.6  # probability of the kernel step, a blur or a sharpening with equal chance
    blur: tuple[float, float] = (0.4, 1.2)  # its Gaussian sigma in pixels (a smoother kernel)
    sharpen: tuple[float, float] = (0.5, 2.0)  # its unsharp-mask weight, sigma 1 pixel (a sharper kernel)
    resolution_p: float = 0.5  # probability of the in-plane resolution step
    resolution: tuple[float, float] = (0.5, 1.0)  # down-sampled to this fraction of the size, then up again
    gamma: float = 0.3  # windowed images only: gamma of exp(+-gamma)
    contrast: float = 0.2  # windowed images only: contrast about mid-grey, +- this fraction

    @classmethod
    def from_config(cls, augment: dict) -> "SiteAugmentation | None":
        """The site augmentation of data.augment when data.augment.site is true, else None."""
        if not augment.get("site"):
            return None
        return cls(**{key[len(SITE_PREFIX):]: value for key, value in augment.items() if key.startswith(SITE_PREFIX)})

    def draw(self, rng: np.random.Generator, windows: Sequence[Window] | None) -> "SiteLook":
        """One scanner's look for one item: jittered `windows` (None for windowed images), a noise level, a kernel,
        a resolution, a gamma and a contrast."""
        jittered = None if windows is None else tuple(
            Window(w.center + rng.uniform(-self.window_center, self.window_center),
                   w.width * (1 + rng.uniform(-self.window_width, self.window_width))) for w in windows)
        noise = rng.uniform(*self.noise)
        blur = sharpen = 0.0
        if rng.random() < self.kernel_p:
            if rng.random() < 0.5:
                blur = rng.uniform(*self.blur)
            else:
                sharpen = rng.uniform(*self.sharpen)
        resolution = rng.uniform(*self.resolution) if rng.random() < self.resolution_p else 1.0
        gamma = math.exp(rng.uniform(-self.gamma, self.gamma))
        contrast = 1 + rng.uniform(-self.contrast, self.contrast)
        return SiteLook(jittered, noise, blur, sharpen, resolution, gamma, contrast, rng)


@dataclass(frozen=True)
class SiteLook:
    """One draw of SiteAugmentation, applied to each slice of one item."""

    windows: tuple[Window, ...] | None
    noise: float
    blur: float
    sharpen: float
    resolution: float
    gamma: float
    contrast: float
    rng: np.random.Generator  # the item's generator: each slice's noise

    def hu_planes(self, hu: np.ndarray) -> list[np.ndarray]:
        """HU of one slice as this scanner would give it, windowed with the jittered windows: noise first, then the
        kernel shapes it and the image alike, then the pixel grid."""
        image = hu.astype(np.float32)
        if self.noise > 0:
            image += self.rng.standard_normal(image.shape, dtype=np.float32) * np.float32(self.noise)
        return window_planes(self.scanner(image), self.windows)

    def planes(self, planes: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Windowed uint8 planes (a PNG/JPG folder) with this kernel and resolution, then gamma and contrast."""
        looked = []
        for plane in planes:
            image = np.clip(self.scanner(plane.astype(np.float32) / 255), 0, 1) ** self.gamma
            image = (image - 0.5) * self.contrast + 0.5
            looked.append(np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8))
        return looked

    def scanner(self, image: np.ndarray) -> np.ndarray:
        """The kernel (blur or unsharp mask), then the resolution (down with area averaging, up bilinearly)."""
        if self.blur > 0:
            image = cv2.GaussianBlur(image, (0, 0), self.blur, borderType=cv2.BORDER_REPLICATE)
        if self.sharpen > 0:
            blurred = cv2.GaussianBlur(image, (0, 0), 1.0, borderType=cv2.BORDER_REPLICATE)
            image = image + self.sharpen * (image - blurred)
        if self.resolution < 1:
            rows, cols = image.shape
            small = (max(4, round(cols * self.resolution)), max(4, round(rows * self.resolution)))
            image = cv2.resize(cv2.resize(image, small, interpolation=cv2.INTER_AREA), (cols, rows),
                               interpolation=cv2.INTER_LINEAR)
        return image


def windowed_augment(augment: dict) -> dict:
    """The keys of data.augment that build_augmentation takes: all but the site augmentation's."""
    return {key: value for key, value in augment.items() if key != "site" and not key.startswith(SITE_PREFIX)}
