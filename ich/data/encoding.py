"""What the pixels of a PNG/JPG slice are (`data.encoding`): windowed with an unknown window, windowed with a known
one, or Hounsfield units.

A DICOM says in its tags how its pixels become HU; an image folder can only say it in the config. The encoding
decides which windows a model trained on the images takes (the checkpoint's `inputs`), and so whether that model
can read HU sources (DICOM, NIfTI, HU images), and whether the images can feed a model trained on another source:
HU images are windowed exactly as DICOMs are, in the loader, by ich.data.windows.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real

import numpy as np

from ich.data.dicom import AIR_HU, MAX_HU
from ich.data.windows import Window, parse_windows

ENCODINGS = ("none", "window", "hu")


@dataclass(frozen=True)
class ImageEncoding:
    """How an image folder's pixels relate to HU.

    Attributes:
        kind: none (windowed, the window unknown), window (windowed with `windows`) or hu (pixel x scale + offset = HU).
        windows: with window, the window each colour channel was made with (one for grayscale images).
        scale, offset: with hu, pixel x scale + offset = HU (16-bit PNGs of HU + 1024: scale 1, offset -1024).
        clip: with hu, the HU range the pixels were clipped to when it is narrower than their type holds; None:
            whatever pixel x scale + offset reaches.
    """

    kind: str = "none"
    windows: tuple[Window, ...] = ()
    scale: float = 1.0
    offset: float = 0.0
    clip: tuple[float, float] | None = None

    @classmethod
    def from_config(cls, encoding: str = "none", encoding_window: object = None, hu_scale: float = 1.0,
                    hu_offset: float = 0.0, hu_clip: Sequence[float] | None = None) -> "ImageEncoding":
        """The encoding the `data.encoding*` and `data.hu_*` keys declare, each contradiction refused naming its key."""
        if encoding not in ENCODINGS:
            raise ValueError(f"Unknown data.encoding={encoding}: use none (windowed, window unknown), window (with "
                             "data.encoding_window) or hu (with data.hu_scale and data.hu_offset).")
        if (encoding == "window") != (encoding_window is not None):
            raise ValueError("data.encoding_window is the window of data.encoding=window images and is read with it "
                             "alone: give both (e.g. data.encoding=window data.encoding_window=[40,80]) or neither.")
        if hu_clip is not None and encoding != "hu":
            raise ValueError("data.hu_clip is the HU range of data.encoding=hu images: set data.encoding=hu or leave "
                             "data.hu_clip out.")
        if not float(hu_scale) > 0:
            raise ValueError(f"data.hu_scale={hu_scale}: give the positive HU per pixel level (1 for images that "
                             "store whole HU).")
        clip = None
        if hu_clip is not None:
            low, high = (float(value) for value in hu_clip)
            if not low < high:
                raise ValueError(f"data.hu_clip={list(hu_clip)}: give [lowest, highest] HU the pixels were clipped to.")
            clip = (low, high)
        windows = () if encoding_window is None else tuple(parse_encoding_windows(encoding_window))
        return cls(encoding, windows, float(hu_scale), float(hu_offset), clip)

    def to_hu(self, pixels: np.ndarray) -> np.ndarray:
        """float32 HU of hu-encoded pixels, clipped to [-1024, 3071] as the DICOM reader clips (ich.data.dicom)."""
        hu = pixels.astype(np.float32)
        hu *= np.float32(self.scale)
        hu += np.float32(self.offset)
        return np.clip(hu, AIR_HU, MAX_HU, out=hu)

    def hu_range(self, dtype: np.dtype) -> tuple[float, float]:
        """The HU that images of this pixel type can hold: the stated clip, else the type's range through scale and
        offset, within the [-1024, 3071] that DICOMs are read in too."""
        if self.clip is not None:
            low, high = self.clip
        else:
            limits = np.iinfo(dtype)
            low, high = limits.min * self.scale + self.offset, limits.max * self.scale + self.offset
        return max(low, AIR_HU), min(high, MAX_HU)

    def check_windows(self, windows: Sequence[Window], dtype: np.dtype) -> None:
        """Refuse a window that reaches past the HU these images hold: its planes would differ from a DICOM's
        wherever the clipped tissue lies, and a model trained on DICOMs would see images unlike its training's."""
        low, high = self.hu_range(dtype)
        for window in windows:
            start, end = window.center - window.width / 2, window.center + window.width / 2
            if start < low or end > high:
                raise ValueError(
                    f"The window [{window.center:g}, {window.width:g}] needs HU {start:g} to {end:g}, but these "
                    f"{np.dtype(dtype).name} images hold only {low:g} to {high:g} (data.hu_clip, or what the pixels x "
                    "data.hu_scale + data.hu_offset reach): use windows inside that range in data.windows, or data "
                    "that keeps it (DICOMs).")


def parse_encoding_windows(spec: object) -> list[Window]:
    """`data.encoding_window`: one window (a name or a [centre, width] pair) or a list of them, one per channel."""
    entries = spec if isinstance(spec, Sequence) and not isinstance(spec, str) and not _is_pair(spec) else [spec]
    return parse_windows(entries, option="data.encoding_window")


def _is_pair(spec: object) -> bool:
    return isinstance(spec, Sequence) and len(spec) == 2 and all(
        isinstance(value, Real) and not isinstance(value, bool) for value in spec)
