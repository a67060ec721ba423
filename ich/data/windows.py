"""CT windows: map a Hounsfield-unit range to 0..255 so each tissue class gets its own channel."""

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch

# (center, width) in HU of the windows radiologists read head CT with.
WINDOWS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (80.0, 200.0),
    "soft": (40.0, 380.0),
    "bone": (600.0, 2800.0),
}


@dataclass(frozen=True)
class Window:
    """Maps [center - width/2, center + width/2] HU linearly to 0..255 (uint8) and clips outside.

    uint8 is what every stage after windowing carries: a quarter of float32's bytes to augment, collate
    and copy to the GPU, where `to_unit_float` makes [0, 1] floats of it. One level is width/255 HU
    (0.3 HU in the brain window, finer than CT's whole HU).
    """

    center: float
    width: float

    def __post_init__(self) -> None:
        if not self.width > 0:
            raise ValueError(f"Window width must be positive, got {self.width}: give a width > 0 HU.")

    def __call__(self, hu: np.ndarray) -> np.ndarray:
        """Window HU of any shape and real dtype (rounded to whole HU first) into a uint8 array of that shape."""
        hu = as_whole_hu(hu)
        flat = hu.reshape(-1, hu.shape[-1]) if hu.ndim else hu.reshape(1, 1)  # OpenCV takes 2-D arrays
        scale, low = 255.0 / self.width, self.center - self.width / 2
        if float(low).is_integer():
            # Clamping at the low edge first leaves x - low >= 0, so the absolute value taken by
            # convertScaleAbs changes nothing: one vectorised pass each, ~20 us for 256x256.
            windowed = cv2.convertScaleAbs(cv2.max(flat, float(low)), alpha=scale, beta=-low * scale)
        else:
            # A clamp at a fractional edge would round it: the general (slower) saturating a*x + b.
            windowed = cv2.addWeighted(flat, scale, flat, 0.0, -low * scale, dtype=cv2.CV_8U)
        return windowed.reshape(hu.shape)


def parse_windows(spec: str | Sequence, option: str = "data.windows") -> list[Window]:
    """Build windows from config entries: names from WINDOWS and/or [center, width] pairs.

    `spec` may be an OmegaConf ListConfig; `option` names the config key in error messages.
    """
    entries = [spec] if isinstance(spec, str) else list(spec)
    if not entries:
        raise ValueError(f"{option} is empty: list at least one window, e.g. [brain, subdural, bone].")
    return [_parse_window(entry, option) for entry in entries]


def _parse_window(entry: object, option: str) -> Window:
    known = ", ".join(WINDOWS)
    if isinstance(entry, str):
        if entry not in WINDOWS:
            raise ValueError(
                f"Unknown window {entry!r} in {option}: use one of {known} or a [center, width] pair."
            )
        return Window(*WINDOWS[entry])
    try:
        center, width = (float(value) for value in entry)  # type: ignore[attr-defined]
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"Bad window {entry!r} in {option}: use one of {known} or a [center, width] pair of numbers."
        ) from err
    return Window(center, width)


def window_pairs(windows: Sequence[Window]) -> list[list[float]]:
    """Windows as a checkpoint's `inputs` keep them: [center, width] pairs, which parse_windows reads back."""
    return [[window.center, window.width] for window in windows]


def window_stack(hu: np.ndarray, windows: Sequence[Window]) -> np.ndarray:
    """Window an HxW HU image into an HxWxC uint8 image, one channel per window."""
    return merge_channels(window_planes(hu, windows))


def window_planes(hu: np.ndarray, windows: Sequence[Window]) -> list[np.ndarray]:
    """One HxW uint8 plane per window, the HU converted to whole int16 once for all of them."""
    hu = as_whole_hu(hu)
    return [window(hu) for window in windows]


def merge_channels(planes: Sequence[np.ndarray]) -> np.ndarray:
    """HxW planes into one HxWxC image (C may exceed OpenCV's 4 colour channels)."""
    if len(planes) == 1:  # a copy (the plane may be a read-only view into the slice cache)
        return np.array(planes[0])[..., None]
    return cv2.merge(list(planes))


def as_whole_hu(hu: np.ndarray) -> np.ndarray:
    """HU as a contiguous int16 array: the input itself when it already is one, else rounded."""
    if hu.dtype != np.int16:
        hu = np.rint(np.clip(hu, -32768, 32767)).astype(np.int16)
    return np.ascontiguousarray(hu)


def to_unit_float(image: torch.Tensor) -> torch.Tensor:
    """Windowed uint8 images (what the data modules give) as float32 in [0, 1]; float input is returned as is.

    Done where the batch already is, on the GPU in training: four times fewer bytes cross the bus.
    """
    return image.float().div_(255.0) if image.dtype == torch.uint8 else image
