"""Slices of one split as uint8 tensors: read, window, stack the context slices, augment.

One path per source: a DICOM (or its row of the slice cache), or a PNG/JPG slice that stores HU
(data.encoding=hu), is read as int16 HU and windowed into uint8 planes here, in the loader workers, and
nowhere else; other PNG/JPG slices come windowed already. A loader of HU gives both: `loader(row)` the planes,
`loader.hu(row)` the HU, which the site augmentation (ich.data.augment) changes before windowing them itself.
"""

import ctypes
import gc
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import albumentations as A
import cv2
import numpy as np
import torch
from lightning_fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import Dataset, DistributedSampler, default_collate
from tqdm.auto import tqdm

from ich.data.augment import SiteAugmentation, SiteLook
from ich.data.cache import SliceCache
from ich.data.dicom import DicomReadError, read_hu_square, square_hu
from ich.data.encoding import ImageEncoding
from ich.data.windows import Window, merge_channels, window_planes

log = logging.getLogger(__name__)

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


class HULoader:
    """What the loaders of HU share: a row's planes are its HU (`hu(row)`, from the subclass) in each of `windows`."""

    windows: tuple[Window, ...]

    @property
    def channels(self) -> int:
        """Channels per slice that reach the model."""
        return len(self.windows)

    def __call__(self, row: int) -> list[np.ndarray]:
        return window_planes(self.hu(row), self.windows)

    def hu(self, row: int) -> np.ndarray:
        raise NotImplementedError


@dataclass(frozen=True)
class DicomLoader(HULoader):
    """Index row -> its DICOM file as int16 HU on a square of `size` -> one uint8 plane per window.

    `paths` is a numpy array of byte strings (one per index row), not a list of Python strings: loader
    workers would copy every string object they touch (reference counts), an array they only read.
    """

    paths: np.ndarray
    windows: tuple[Window, ...]
    size: int

    def hu(self, row: int) -> np.ndarray:
        """The row's slice as int16 HU on the square, before windowing."""
        return read_hu_square(self.paths[row].decode(), self.size)


@dataclass(frozen=True)
class CacheLoader(HULoader):
    """Index row -> the same planes as DicomLoader, from the slice cache (whose rows follow the index)."""

    cache: SliceCache
    windows: tuple[Window, ...]

    def hu(self, row: int) -> np.ndarray:
        """The row's slice as int16 HU on the square, before windowing (a read-only view into the cache)."""
        return self.cache.row(row)


@dataclass(frozen=True)
class ImageLoader:
    """Table row -> an already windowed PNG/JPG slice as uint8 planes of `size` (16-bit images scaled to 8)."""

    paths: np.ndarray
    size: int
    channels: int = 1
    windows = None  # its pixels are windowed already, with no HU to window again (see `hu` of the others)

    def __call__(self, row: int) -> list[np.ndarray]:
        image = read_image(self.paths[row].decode(), cv2.IMREAD_UNCHANGED)
        if image.dtype == np.uint16:
            image = cv2.convertScaleAbs(image, alpha=255.0 / 65535.0)
        planes = [image] if image.ndim == 2 else list(reversed(cv2.split(image)[:3]))  # BGR(A) -> RGB
        if len(planes) != self.channels:
            # grayscale stored as RGB (or the other way round): keep what the dataset was declared with
            planes = planes[: self.channels] if self.channels == 1 else planes[:1] * self.channels
        return [cv2.resize(plane, (self.size, self.size), interpolation=cv2.INTER_AREA) for plane in planes]


@dataclass(frozen=True)
class HUImageLoader(HULoader):
    """Table row -> a PNG/JPG slice that stores HU (data.encoding=hu) as int16 HU on a square of `size`, as
    DicomLoader makes a DICOM's -> one uint8 plane per window: the planes a DICOM of the same HU gives."""

    paths: np.ndarray
    encoding: ImageEncoding
    windows: tuple[Window, ...]
    size: int

    def hu(self, row: int) -> np.ndarray:
        """The row's slice as int16 HU on the square, before windowing."""
        pixels = read_image(self.paths[row].decode(), cv2.IMREAD_ANYDEPTH)  # one channel, 16 bits kept
        return square_hu(self.encoding.to_hu(pixels), self.size)


def read_image(path: str, flags: int) -> np.ndarray:
    """A PNG/JPG file as cv2.imread reads it with `flags`; an unreadable one raises OSError, skipped like a bad DICOM."""
    image = cv2.imread(path, flags)
    if image is None:
        raise OSError(f"{path} is not a readable PNG/JPG image.")
    return image


class MemoryLoader:
    """Index row -> the planes another loader gave for it once, at setup: small datasets are read, decoded,
    resized and windowed once, not every epoch (augmentation stays per epoch).

    The planes are one uint8 array [rows, channels, size, size]; loader workers share it with the main
    process. A row that failed to read raises the error it raised then, so it is skipped as before.
    With `keep_hu` (site augmentation, which changes HU before windowing) it keeps the int16 HU instead,
    [rows, size, size], and windows them at each access as the loader it read them with would.
    """

    def __init__(self, loader, rows: int, size: int, threads: int | None = None, keep_hu: bool = False):
        if keep_hu and loader.windows is None:
            raise ValueError("MemoryLoader(keep_hu=True) needs a loader of HU; windowed images have none: "
                             "keep their planes (keep_hu=False).")
        self.channels = loader.channels
        self.windows = loader.windows if keep_hu else None  # None: planes only, as ImageLoader gives
        # what was read: uint8 planes [rows, channels, size, size], or with keep_hu int16 HU [rows, size, size]
        self.slices = np.zeros((rows, size, size) if keep_hu else (rows, loader.channels, size, size),
                               np.int16 if keep_hu else np.uint8)
        self.failed: dict[int, Exception] = {}

        def read(row: int) -> None:
            try:
                self.slices[row] = loader.hu(row) if keep_hu else np.stack(loader(row))
            except (DicomReadError, OSError) as err:  # skipped at access, like an unreadable file
                self.failed[row] = err

        with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:  # decoders release the GIL
            list(tqdm(pool.map(read, range(rows)), total=rows, desc="Reading slices into memory", unit="slice",
                      mininterval=1.0, disable=rows < 1000))

    def __call__(self, row: int) -> list[np.ndarray]:
        if self.windows is not None:
            return window_planes(self.hu(row), self.windows)
        if row in self.failed:
            raise self.failed[row]
        return list(self.slices[row])

    def hu(self, row: int) -> np.ndarray:
        """The row's int16 HU (with keep_hu only)."""
        if row in self.failed:
            raise self.failed[row]
        return self.slices[row]


def as_bytes(values) -> np.ndarray:
    """Strings (ids, paths) as one fixed-width byte array: no Python object per row."""
    return np.asarray([str(v) for v in values], dtype=bytes) if len(values) else np.zeros(0, "S1")


class SliceDataset(Dataset):
    """One item per labelled slice: its stack of rows read, windowed, merged into channels, augmented.

    Every per-slice field is a numpy array, so DataLoader workers share it with the main process
    instead of copying it (see STYLE.md, point 14).

    Args:
        stacks: int [N, 2k+1], per item the rows the loader reads: the slice's neighbours s-k..s+k in its
            series (one column without context). The centre column is the labelled slice itself.
        targets: per item the target row (float labels, or a class index for subtype).
        image_ids: byte strings [N], per item the id reported in predictions.
        loader: turns one row into HxW uint8 planes, one per channel; one of HU (its `windows` set) also gives
            the row's HU (`loader.hu(row)`).
        transform: an albumentations pipeline for training, or None for validation and test.
        site: the site augmentation for training (ich.data.augment), or None: applied to the HU of a loader of HU
            before windowing, else to the windowed planes, and before `transform`.
    """

    def __init__(self, stacks: np.ndarray, targets: np.ndarray, image_ids: np.ndarray, loader,
                 transform: A.BaseCompose | None = None, seed: int = 0, site: SiteAugmentation | None = None):
        stacks = np.asarray(stacks, dtype=np.int64)
        self.stacks = stacks if stacks.ndim == 2 else stacks[:, None]
        self.targets, self.image_ids = targets, image_ids
        self.loader, self.transform, self.seed, self.site = loader, transform, seed, site

    def __len__(self) -> int:
        return len(self.stacks)

    def subset(self, items: np.ndarray, transform: A.BaseCompose | None = None,
               site: SiteAugmentation | None = None) -> "SliceDataset":
        """These items only (row numbers of this dataset), with `transform` and `site` instead of this one's."""
        return SliceDataset(self.stacks[items], self.targets[items], self.image_ids[items], self.loader,
                            transform, self.seed, site)

    @property
    def channels(self) -> int:
        """Channels of an item: a lone plane is repeated to three (see `image`), any other count kept."""
        planes = self.loader.channels * self.stacks.shape[1]
        return 3 if planes == 1 else planes

    def image(self, i: int, epoch: int | None = None) -> np.ndarray:
        """Slice `i` as an HxWxC uint8 image; with an `epoch` (from EpochShuffle) its augmentation is
        seeded by (seed, epoch, i), the site augmentation's too."""
        if self.site is None:
            planes = [plane for row in self.stacks[i] for plane in self.loader(int(row))]
        else:
            rng = np.random.default_rng(None if epoch is None else self._seed(i, epoch))
            look = self.site.draw(rng, self.loader.windows)
            planes = [plane for row in self.stacks[i] for plane in self._site_planes(look, int(row))]
        if len(planes) == 1:
            planes *= 3  # one window: three identical channels for ImageNet stems
        image = merge_channels(planes)
        if self.transform is not None:
            if epoch is not None:
                self.transform.set_random_seed(self._seed(i, epoch))
            image = self.transform(image=image)["image"]
        return np.ascontiguousarray(image)

    def _site_planes(self, look: SiteLook, row: int) -> list[np.ndarray]:
        """One row's planes in the look of another scanner: from its HU where the loader has them."""
        if self.loader.windows is None:
            return look.planes(self.loader(row))
        return look.hu_planes(self.loader.hu(row))

    def _seed(self, i: int, epoch: int) -> int:
        return int(np.random.SeedSequence([self.seed, epoch, i]).generate_state(1)[0])

    def __getitem__(self, key: int | tuple[int, int]) -> dict | None:
        epoch, i = key if isinstance(key, tuple) else (None, key)
        try:
            image = self.image(i, epoch)
        except (DicomReadError, OSError) as err:
            # The index read every file once; a file failing now changed on disk. Skip the slice, say which.
            log.warning("Skipping %s in this batch: %s", self.image_ids[i].decode(), err)
            return None
        # CxHxW as the models take it, over HxWxC memory: collate_skipping copies each in one piece.
        return {"image": torch.from_numpy(image).permute(2, 0, 1), "target": torch.as_tensor(self.targets[i]),
                "image_id": self.image_ids[i].decode()}


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
    """DataLoader worker start: keep the parent's objects shared, reuse freed memory, and seed as Lightning
    does after seed_everything(workers=True).

    A forked worker shares the parent's memory until it writes to it, and a full garbage collection
    writes to every object it traverses: with RSNA's index in the parent that copied ~135 MB into each
    worker during the first epoch (`python -m ich.bench --scale`). Freezing moves the inherited objects
    out of the collector's reach without touching them; the worker's own objects are collected as usual.
    """
    gc.freeze()
    # NOTE: OpenCV's thread count is left alone: cv2.setNumThreads in a forked worker whose parent has run
    # OpenCV's thread pool (resizing slices into memory, say) waits forever on the pool's lost threads.
    reuse_freed_memory()
    if int(os.environ.get("PL_SEED_WORKERS", 0)):  # a worker_init_fn of ours replaces the one Lightning would add
        pl_worker_init_function(worker_id)
