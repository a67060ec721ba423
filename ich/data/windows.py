"""CT windows: map a Hounsfield-unit range to [0, 1] so each tissue class gets its own channel."""

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# (center, width) in HU of the windows radiologists read head CT with.
WINDOWS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (80.0, 200.0),
    "soft": (40.0, 380.0),
    "bone": (600.0, 2800.0),
}


@dataclass(frozen=True)
class Window:
    """Maps [center - width/2, center + width/2] HU linearly to [0, 1] and clips outside."""

    center: float
    width: float

    def __post_init__(self) -> None:
        if not self.width > 0:
            raise ValueError(f"Window width must be positive, got {self.width}: give a width > 0 HU.")

    def __call__(self, hu: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Window `hu` (any real dtype) into float32, in place in `out` when given."""
        # The explicit dtype keeps integer or float64 inputs from promoting the result to float64.
        out = np.subtract(hu, self.center - self.width / 2, out=out, dtype=np.float32)
        np.multiply(out, 1.0 / self.width, out=out)
        return np.clip(out, 0.0, 1.0, out=out)


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


def window_stack(hu: np.ndarray, windows: Sequence[Window], out: np.ndarray | None = None) -> np.ndarray:
    """Window an HU image (any shape) into a float32 array with one more axis, one channel per window.

    int16 HU, what `read_hu_square` and the slice cache give, go through a table of every int16 value's
    windowed result: one gather per pixel instead of float temporaries per window, and the very numbers
    the arithmetic gives for the same values. Other dtypes are windowed arithmetically.
    """
    shape = (*hu.shape, len(windows))
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif out.shape != shape or out.dtype != np.float32:
        raise ValueError(
            f"window_stack needs out of shape {shape} and dtype float32, got {out.shape} {out.dtype}."
        )
    if hu.dtype == np.int16:
        # Viewed as uint16, -1 is 65535: the table is laid out in that order, so no offset is added.
        return np.take(_window_table(tuple(windows)), hu.view(np.uint16), axis=0, out=out, mode="clip")
    # Each window is computed in a contiguous scratch image and then copied into its channel:
    # element-wise work on the strided channel views directly is several times slower.
    scratch = np.empty(hu.shape, dtype=np.float32)
    for channel, window in enumerate(windows):
        out[..., channel] = window(hu, out=scratch)
    return out


@functools.lru_cache(maxsize=16)
def _window_table(windows: tuple[Window, ...]) -> np.ndarray:
    """65536 x C float32: row u holds the windows of the int16 value whose bits read u as uint16."""
    values = np.arange(65536, dtype=np.uint16).view(np.int16)
    table = np.stack([window(values) for window in windows], axis=1)
    table.flags.writeable = False
    return table
