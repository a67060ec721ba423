"""Slices of one split as tensors: read, window, stack the context slices, augment."""

import logging
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from ich.data.dicom import DicomReadError, fit_to_square, read_hu
from ich.data.windows import Window, window_stack

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DicomLoader:
    """DICOM -> HU -> square image of `size` -> one channel per window."""

    windows: tuple[Window, ...]
    size: int

    @property
    def channels(self) -> int:
        return len(self.windows)

    def __call__(self, path: str) -> np.ndarray:
        return window_stack(fit_to_square(read_hu(path), self.size), list(self.windows))


@dataclass(frozen=True)
class ImageLoader:
    """An already windowed PNG/JPG slice -> float image in [0, 1] of `size`, channels kept."""

    size: int
    channels: int = 1

    def __call__(self, path: str) -> np.ndarray:
        image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        if image is None:
            raise OSError(f"{path} is not a readable PNG/JPG image.")
        scale = 65535.0 if image.dtype == np.uint16 else 255.0
        image = image[..., None] if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        if image.shape[2] != self.channels:
            # grayscale stored as RGB (or the other way round): keep what the dataset was declared with
            image = image[..., :1] if self.channels == 1 else np.repeat(image[..., :1], self.channels, axis=2)
        resized = cv2.resize(image.astype(np.float32) / scale, (self.size, self.size), interpolation=cv2.INTER_AREA)
        return resized.reshape(self.size, self.size, self.channels)


class SliceDataset(Dataset):
    """One item per slice; with context, the neighbouring slices' channels come along.

    Args:
        stacks: per item the paths to read, neighbours first to last (one path without context).
        targets: per item the target row (float labels, or a class index for subtype).
        image_ids: per item the id reported in predictions.
        loader: turns one path into an HxWxC float image.
        transform: an albumentations pipeline, or None for validation and test.
    """

    def __init__(self, stacks: list[list[str]], targets: np.ndarray, image_ids: list[str], loader, transform=None):
        self.stacks, self.targets, self.image_ids = stacks, targets, image_ids
        self.loader, self.transform = loader, transform

    def __len__(self) -> int:
        return len(self.stacks)

    @property
    def channels(self) -> int:
        return max(3, self.loader.channels * len(self.stacks[0])) if self.stacks else 0

    def image(self, i: int) -> np.ndarray:
        parts = [self.loader(path) for path in self.stacks[i]]
        image = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=2)
        if image.shape[2] == 1:
            image = np.repeat(image, 3, axis=2)  # one window: three identical channels for ImageNet stems
        if self.transform is not None:
            image = np.clip(self.transform(image=image)["image"], 0.0, 1.0)
        return np.ascontiguousarray(image.transpose(2, 0, 1))

    def __getitem__(self, i: int) -> dict | None:
        try:
            image = self.image(i)
        except (DicomReadError, OSError) as err:
            # The index read every file once; a file failing now changed on disk. Skip the slice, say which.
            log.warning("Skipping %s in this batch: %s", self.image_ids[i], err)
            return None
        return {"image": torch.from_numpy(image), "target": torch.as_tensor(self.targets[i]), "image_id": self.image_ids[i]}


def collate_skipping(items: list[dict | None]) -> dict:
    """Batch the slices that could be read; an unreadable one was already reported by the dataset."""
    kept = [item for item in items if item is not None]
    if not kept:
        raise RuntimeError("Every slice of a batch failed to read: the data folder changed since it was indexed; run ich.prepare again.")
    return default_collate(kept)
