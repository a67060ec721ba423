"""Random augmentation of windowed slices: the order lives here, the strengths in `data.augment`.

The steps are the ones the papers and the strongest RSNA solutions used: horizontal flip,
rotation with a small stretch, Gaussian blur, brightness/contrast. Every step works on any
number of channels (windows x context slices) at once, so all channels move together.

It runs in the loader workers on each windowed uint8 slice (albumentations, OpenCV), seeded per
(seed, epoch, slice) by the dataset.
"""


import albumentations as A
import cv2


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
