"""Slices of one split as uint8 tensors: read, window, stack the context slices, augment."""

import ctypes
import logging
import os
from dataclasses import dataclass

import albumentations as A
import cv2
import numpy as np
import torch
from lightning_fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import Dataset, DistributedSampler, default_collate

from ich.data.augment import DeviceAugmentation
from ich.data.cache import SliceCache
from ich.data.dicom import DicomReadError, read_hu_square
from ich.data.windows import Window, merge_channels, window_planes

log = logging.getLogger(__name__)

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@dataclass(frozen=True)
class DicomLoader:
    """DICOM -> int16 HU on a square of `size` -> one uint8 plane per window (or, windowed on the
    device, the HU plane itself)."""

    windows: tuple[Window, ...]
    size: int
    window_on_device: bool = False

    @property
    def channels(self) -> int:
        """Channels per slice that reach the model."""
        return len(self.windows)

    def __call__(self, path: str) -> list[np.ndarray]:
        hu = read_hu_square(path, self.size)
        return [hu] if self.window_on_device else window_planes(hu, self.windows)


@dataclass(frozen=True)
class CacheLoader:
    """A row of the slice cache -> one uint8 plane per window: the DicomLoader's result, without the DICOM."""

    cache: SliceCache
    windows: tuple[Window, ...]
    window_on_device: bool = False

    def __post_init__(self) -> None:
        if self.cache.format == "window8" and self.cache.windows != tuple(self.windows):
            raise ValueError(f"The slice cache {self.cache.folder} holds other windows than data.windows: "
                             "build it again with these windows, or use data.cache_format=hu16.")
        if self.cache.format == "window8" and self.window_on_device:
            raise ValueError("A window8 slice cache is windowed already: it cannot be windowed on the device.")

    @property
    def channels(self) -> int:
        """Channels per slice that reach the model."""
        return len(self.windows)

    def __call__(self, row: int) -> list[np.ndarray]:
        stored = self.cache.row(row)
        if self.cache.format == "window8":
            return list(stored)
        return [stored] if self.window_on_device else window_planes(stored, self.windows)


@dataclass(frozen=True)
class ImageLoader:
    """An already windowed PNG/JPG slice -> its channels as uint8 planes of `size` (16-bit images scaled to 8)."""

    size: int
    channels: int = 1

    def __call__(self, path: str) -> list[np.ndarray]:
        image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        if image is None:
            raise OSError(f"{path} is not a readable PNG/JPG image.")
        if image.dtype == np.uint16:
            image = cv2.convertScaleAbs(image, alpha=255.0 / 65535.0)
        planes = [image] if image.ndim == 2 else list(reversed(cv2.split(image)[:3]))  # BGR(A) -> RGB
        if len(planes) != self.channels:
            # grayscale stored as RGB (or the other way round): keep what the dataset was declared with
            planes = planes[: self.channels] if self.channels == 1 else planes[:1] * self.channels
        return [cv2.resize(plane, (self.size, self.size), interpolation=cv2.INTER_AREA) for plane in planes]


class SliceDataset(Dataset):
    """One item per slice; with context, the neighbouring slices' channels come along.

    Args:
        stacks: per item what the loader reads (paths, or slice-cache rows), neighbours first to last
            (one entry without context).
        targets: per item the target row (float labels, or a class index for subtype).
        image_ids: per item the id reported in predictions.
        loader: turns one entry of a stack into HxW uint8 planes, one per channel.
        transform: an albumentations pipeline (applied here), a DeviceAugmentation (its parameters drawn
            here, applied to the batch on the GPU), or None for validation and test.
    """

    def __init__(
        self,
        stacks: list[list[str]] | list[list[int]],
        targets: np.ndarray,
        image_ids: list[str],
        loader,
        transform=None,
        seed: int = 0,
    ):
        self.stacks, self.targets, self.image_ids = stacks, targets, image_ids
        self.loader, self.transform, self.seed = loader, transform, seed
        self.hu_planes = getattr(loader, "window_on_device", False)
        if self.hu_planes and isinstance(transform, A.BaseCompose):
            raise ValueError("Slices windowed on the device reach the dataset as HU: augment them on the device too.")
        # Batches of HU say which windows the device applies (see ich.data.ondevice).
        self._windows = torch.tensor([[w.center, w.width] for w in loader.windows]) if self.hu_planes else None

    def __len__(self) -> int:
        return len(self.stacks)

    @property
    def channels(self) -> int:
        return max(3, self.loader.channels * len(self.stacks[0])) if self.stacks else 0

    def image(self, i: int, epoch: int | None = None) -> np.ndarray:
        """Slice `i` as an HxWxC uint8 image (int16 HU, one channel per slice, when windowed on the device);
        with an `epoch` (from EpochShuffle) its augmentation is seeded by (seed, epoch, i)."""
        planes = [plane for key in self.stacks[i] for plane in self.loader(key)]
        if len(planes) == 1 and not self.hu_planes:
            planes *= 3  # one window: three identical channels for ImageNet stems (HU: on the device)
        image = merge_channels(planes)
        if isinstance(self.transform, A.BaseCompose):
            if epoch is not None:
                self.transform.set_random_seed(self._seed(i, epoch))
            image = self.transform(image=image)["image"]
        return np.ascontiguousarray(image)

    def _seed(self, i: int, epoch: int) -> int:
        return int(np.random.SeedSequence([self.seed, epoch, i]).generate_state(1)[0])

    def __getitem__(self, key: int | tuple[int, int]) -> dict | None:
        epoch, i = key if isinstance(key, tuple) else (None, key)
        try:
            image = self.image(i, epoch)
        except (DicomReadError, OSError) as err:
            # The index read every file once; a file failing now changed on disk. Skip the slice, say which.
            log.warning("Skipping %s in this batch: %s", self.image_ids[i], err)
            return None
        # CxHxW as the models take it, over HxWxC memory: collate_skipping copies each in one piece.
        item = {"image": torch.from_numpy(image).permute(2, 0, 1), "target": torch.as_tensor(self.targets[i]),
                "image_id": self.image_ids[i]}
        if self._windows is not None:
            item["windows"] = self._windows
        if isinstance(self.transform, DeviceAugmentation):
            # The parameters only; ich.data.ondevice.finish_batch moves the pixels on the GPU.
            rng = np.random.default_rng(None if epoch is None else [self.seed, epoch, i])
            item["augment"] = torch.from_numpy(self.transform.draw(rng))
        return item


class EpochShuffle(DistributedSampler):
    """Shuffles by (seed, epoch) and hands each slice its epoch, as `(epoch, index)` keys.

    The dataset seeds the slice's augmentation from (seed, epoch, index), so what the model sees depends
    on the seed alone, not on worker processes or on where a run was interrupted: two seeded runs agree,
    and a resumed run continues exactly as an uninterrupted one. Being a DistributedSampler, it is kept
    under DDP (each rank takes its share) and Lightning sets its epoch.
    """

    def __init__(self, dataset: Dataset, seed: int):
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        super().__init__(dataset, num_replicas=None if distributed else 1, rank=None if distributed else 0,
                         shuffle=True, seed=seed)

    def __iter__(self):
        return ((self.epoch, i) for i in super().__iter__())


def collate_skipping(items: list[dict | None]) -> dict:
    """Batch the slices that could be read; an unreadable one was already reported by the dataset.

    Images are stacked as NxHxWxC, one contiguous copy per slice, and handed on viewed as NxCxHxW:
    the channels-last layout that GPUs convolve fastest and `.to(device)` keeps.
    """
    kept = [item for item in items if item is not None]
    if not kept:
        raise RuntimeError("Every slice of a batch failed to read: the data folder changed since it was indexed; run ich.prepare again.")
    batch = default_collate([{key: value for key, value in item.items() if key != "image"} for item in kept])
    batch["image"] = default_collate([item["image"].permute(1, 2, 0) for item in kept]).permute(0, 3, 1, 2)
    return batch


def reuse_freed_memory() -> None:
    """Let this process reuse freed memory for the next slice instead of returning it to the kernel.

    By default glibc maps every array over 128 KB afresh and unmaps it when freed, so each slice pays
    for hundreds of zero-filled page faults, which cost more than windowing it. Arrays up to 32 MB then
    come from the heap, and up to 1 GB of freed heap is kept: a worker holds its peak working set
    instead of refaulting it every batch. Without glibc (macOS, musl) nothing changes.
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        mallopt(_M_TRIM_THRESHOLD, 1 << 30)


def init_worker(worker_id: int) -> None:
    """DataLoader worker start: reuse freed memory, and seed as Lightning does after seed_everything(workers=True)."""
    reuse_freed_memory()
    if int(os.environ.get("PL_SEED_WORKERS", 0)):  # a worker_init_fn of ours replaces the one Lightning would add
        pl_worker_init_function(worker_id)
