"""Random augmentation of slices: the order lives here, the strengths in `data.augment`.

The steps are the ones the papers and the strongest RSNA solutions used: horizontal flip,
rotation with a small stretch, Gaussian blur, brightness/contrast. Every step works on any
number of channels (windows x context slices) at once, so all channels move together.

It runs in the loader workers on each windowed uint8 slice (albumentations, OpenCV), seeded per
(seed, epoch, slice) by the dataset.

Site augmentation (`data.augment.site=true`, off by default) comes first: another scanner's look, on the HU of
each slice before it is windowed (blood density, reconstruction kernel, noise, in-plane resolution, window jitter),
or on the planes of a PNG/JPG folder that comes windowed (kernel, resolution, gamma and contrast).
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


SCANNER_MATRIX = 512  # pixels per side of a CT slice as scanners reconstruct it: the site strengths are stated there
# The blood-density step: HU between brain and this top are pulled towards brain; up to the return, back to as is.
DENSITY_BRAIN, DENSITY_TOP, DENSITY_RETURN = 35.0, 90.0, 150.0


@dataclass(frozen=True)
class SiteAugmentation:
    """Strengths of the site augmentation (data.augment.site_*): what another scanner, or another hospital's
    patients, change in the same head.

    A draw (`draw`) is one scanner's look, shared by every slice of one item (its context neighbours come from
    the same scanner); only the noise differs from slice to slice. A strength of 0 (or a probability of 0) leaves
    its step out. Noise and kernel are stated as they are on a scanner's 512-pixel slice and scaled to the size the
    slice reaches the model at: resizing 512 to 128 px averages 4 x 4 pixels, which leaves white noise a quarter of
    its SD, and a kernel a quarter of its width.
    """

    p: float = 0.5  # probability that an item gets another look at all; the others stay as the home site gave them
    window_center: float = 10.0  # HU, +-: each window's centre moves by up to this
    window_width: float = 0.2  # +- this fraction of each window's width
    noise: tuple[float, float] = (0.0, 12.0)  # SD of the noise the slice ends with (after the kernel), HU at 512 px
    kernel_p: float = 0.6  # probability of the kernel step, a blur or a sharpening with equal chance
    blur: tuple[float, float] = (0.5, 2.0)  # its Gaussian sigma, pixels at 512 px (a smoother kernel)
    sharpen: tuple[float, float] = (0.5, 2.0)  # its unsharp-mask weight, sigma 1 pixel at 512 px (a sharper kernel)
    resolution_p: float = 0.5  # probability of the in-plane resolution step
    resolution: tuple[float, float] = (0.5, 1.0)  # down-sampled to this fraction of the size, then up again
    density_p: float = 0.5  # probability of the blood-density step
    density: tuple[float, float] = (0.2, 1.0)  # what is left of the HU above brain (35 HU) up to 90 HU
    gamma: float = 0.3  # windowed images only: gamma of exp(+-gamma)
    contrast: float = 0.2  # windowed images only: contrast about mid-grey, +- this fraction

    @classmethod
    def from_config(cls, augment: dict) -> "SiteAugmentation | None":
        """The site augmentation of data.augment when data.augment.site is true, else None."""
        if not augment.get("site"):
            return None
        return cls(**{key[len(SITE_PREFIX):]: value for key, value in augment.items() if key.startswith(SITE_PREFIX)})

    def draw(self, rng: np.random.Generator, windows: Sequence[Window] | None) -> "SiteLook":
        """One look for one item: jittered `windows` (None for windowed images), a noise level, a kernel, a
        resolution, a blood density, a gamma and a contrast; with probability 1 - p the home site's own look."""
        if rng.random() >= self.p:
            return SiteLook(None if windows is None else tuple(windows), 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, rng)
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
        density = rng.uniform(*self.density) if rng.random() < self.density_p else 1.0
        gamma = math.exp(rng.uniform(-self.gamma, self.gamma))
        contrast = 1 + rng.uniform(-self.contrast, self.contrast)
        return SiteLook(jittered, noise, blur, sharpen, resolution, density, gamma, contrast, rng)


@dataclass(frozen=True)
class SiteLook:
    """One draw of SiteAugmentation, applied to each slice of one item."""

    windows: tuple[Window, ...] | None
    noise: float
    blur: float
    sharpen: float
    resolution: float
    density: float
    gamma: float
    contrast: float
    rng: np.random.Generator  # the item's generator: each slice's noise

    def hu_planes(self, hu: np.ndarray) -> list[np.ndarray]:
        """HU of one slice as this look gives it, windowed with the jittered windows: the blood density (of the
        head), then the kernel, the noise the kernel leaves (its SD the drawn one), and the pixel grid."""
        image = self.kernel(blood_density(hu.astype(np.float32), self.density))
        if self.noise > 0:
            noise = self.kernel(self.rng.standard_normal(image.shape, dtype=np.float32))
            image += noise * np.float32(self.noise * scanner_scale(image) / noise.std())
        return window_planes(self.resample(image), self.windows)

    def planes(self, planes: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Windowed uint8 planes (a PNG/JPG folder) with this kernel and resolution, then gamma and contrast."""
        looked = []
        for plane in planes:
            image = np.clip(self.resample(self.kernel(plane.astype(np.float32) / 255)), 0, 1) ** self.gamma
            image = (image - 0.5) * self.contrast + 0.5
            looked.append(np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8))
        return looked

    def kernel(self, image: np.ndarray) -> np.ndarray:
        """The reconstruction kernel: a blur or an unsharp mask, their widths scaled from 512 px to the image's."""
        scale = scanner_scale(image)
        if self.blur > 0:
            image = cv2.GaussianBlur(image, (0, 0), self.blur * scale, borderType=cv2.BORDER_REPLICATE)
        if self.sharpen > 0:
            blurred = cv2.GaussianBlur(image, (0, 0), scale, borderType=cv2.BORDER_REPLICATE)
            image = image + self.sharpen * (image - blurred)
        return image

    def resample(self, image: np.ndarray) -> np.ndarray:
        """The in-plane resolution: down with area averaging, up bilinearly, to the same size."""
        if self.resolution >= 1:
            return image
        rows, cols = image.shape
        small = (max(4, round(cols * self.resolution)), max(4, round(rows * self.resolution)))
        return cv2.resize(cv2.resize(image, small, interpolation=cv2.INTER_AREA), (cols, rows),
                          interpolation=cv2.INTER_LINEAR)


def scanner_scale(image: np.ndarray) -> float:
    """Pixels of `image` per pixel of a scanner's 512-pixel slice, the same field of view."""
    return image.shape[1] / SCANNER_MATRIX


def blood_density(hu: np.ndarray, kept: float) -> np.ndarray:
    """HU with what lies between brain (35 HU) and 90 HU pulled towards brain, `kept` of its excess left, and
    90-150 HU stretched back to as is: acute blood (55-80 HU) as an older bleed or an anaemic patient's would be
    (30-50 HU), while air, brain, CSF and bone stay. `kept` = 1 changes nothing."""
    if kept >= 1:
        return hu
    top = DENSITY_BRAIN + (DENSITY_TOP - DENSITY_BRAIN) * kept
    low, high = np.float32(np.iinfo(np.int16).min), np.float32(np.iinfo(np.int16).max)
    return np.interp(hu, (low, DENSITY_BRAIN, DENSITY_TOP, DENSITY_RETURN, high),
                     (low, DENSITY_BRAIN, top, DENSITY_RETURN, high)).astype(np.float32)


def windowed_augment(augment: dict) -> dict:
    """The keys of data.augment that build_augmentation takes: all but the site augmentation's."""
    return {key: value for key, value in augment.items() if key != "site" and not key.startswith(SITE_PREFIX)}
