"""The LightningDataModule: one interface over the phantom, RSNA DICOMs and image folders.

`prepare_data` writes the phantom, the header index and (with `cache=true`) the slice cache, once a
run (rank 0); `setup` reads the index (nothing else when it is fresh), finds each slice's neighbours
in its series, filters blank slices, splits by patient, keeps the slices the task needs, balances the
training split, and builds one dataset per stage. What was used and what was skipped is counted in
`summary`; what the model needs to know about its inputs is `inputs`, saved in every checkpoint.
"""

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from ich.core.privacy import pseudonym
from ich.core.tasks import SUBTYPES, Task, get_task
from ich.data.augment import SiteAugmentation, build_augmentation, windowed_augment
from ich.data.cache import SliceCache, load_or_build_cache
from ich.data.dataset import (CacheLoader, DicomLoader, EpochShuffle, HUImageLoader, ImageLoader, MemoryLoader,
                              SliceDataset, as_bytes, collate_skipping, init_worker)
from ich.data.encoding import ImageEncoding
from ich.data.index import IndexSummary, add_slice_order, load_or_build_index
from ich.data.multi import READERS, SourceLoaders, check_same_inputs, combine_indices, source_configs, starts_of
from ich.data.nifti import VolumeSource
from ich.data.seen import seen_ranges, series_figures, trained_on
from ich.data.sources import find_rsna_images, find_rsna_labels, read_image_table, read_rsna_labels
from ich.data.splits import STAGES, equal_sources, split_by_patient, split_by_source, undersample
from ich.data.windows import Window, parse_windows, window_pairs

log = logging.getLogger(__name__)

SOURCES = READERS


def phantom_root(cache_dir: Path, settings: dict) -> Path:
    """One folder per phantom setting, so a changed setting never reuses stale files; the site is named in it with
    a key of its profile (phantom-<key>-site-B-<profile key>: a profile changed in code is another folder), except
    for site A, whose folder is the one written before sites existed."""
    from ich.data.phantom import get_site

    others = {name: value for name, value in settings.items() if name != "site"}
    key = hashlib.sha1(json.dumps(others, sort_keys=True).encode()).hexdigest()[:10]
    site = settings.get("site", "A")
    if site == "A":
        return cache_dir / f"phantom-{key}"
    profile = hashlib.sha1(repr(get_site(site)).encode()).hexdigest()[:6]
    return cache_dir / f"phantom-{key}-site-{site}-{profile}"


def ensure_phantom(cache_dir: Path, settings: dict) -> Path:
    """Write the phantom on first use; a half-written one is never mistaken for a finished one."""
    from ich.data.phantom import generate

    root = phantom_root(cache_dir, settings)
    if (root / "stage_2_train.csv").is_file():
        return root
    log.info("Writing the phantom dataset to %s (first use only)", root)
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    generate(tmp, **settings)
    try:
        os.rename(tmp, root)
    except OSError:
        shutil.rmtree(tmp)  # another process finished first; theirs is identical
    return root


def task_rows(table: pd.DataFrame, task: Task) -> pd.Series:
    """Which slices a task trains on: subtype keeps positives that carry exactly one subtype."""
    if task.loss == "ce":
        return table[list(SUBTYPES)].sum(axis=1) == 1
    return pd.Series(True, index=table.index)


def task_targets(table: pd.DataFrame, task: Task) -> np.ndarray:
    values = table[list(task.outputs)].to_numpy()
    if task.loss == "ce":
        return values.argmax(axis=1).astype(np.int64)
    return values.astype(np.float32)


def neighbour_rows(index: pd.DataFrame, context: int) -> np.ndarray:
    """int [N, 2k+1]: per index row, the rows of slices s-k..s+k of its series (edge slices repeated).

    Neighbours are found in the whole index, before any slice is filtered out, so they are the true
    anatomical neighbours (a blank slice dropped from training can still be one), and the centre column
    is always the row itself. The index keeps each series' slices together in slice order (ich.data.index).
    """
    rows = np.arange(len(index))
    if context == 0 or "series" not in index:
        return rows[:, None]
    position = index["slice_index"].to_numpy(np.int64)
    first = rows - position
    length = index["series_length"].to_numpy(np.int64)
    series = pd.factorize(index["series"])[0]
    last = first + length - 1
    if first.min() < 0 or last.max() >= len(index) or not (
        np.array_equal(series[first], series) and np.array_equal(series[last], series)
    ):
        raise ValueError("The index does not hold each series' slices together in slice order: "
                         "rebuild it with `python -m ich.prepare force=true`.")
    offsets = np.arange(-context, context + 1)
    return first[:, None] + np.clip(position[:, None] + offsets, 0, length[:, None] - 1)


def check_slice_order(index: pd.DataFrame, option: str) -> None:
    """PNG/JPG folders know the order of a series' slices only from columns of data.labels: name them if absent."""
    if "series_length" not in index:
        raise ValueError(f"{option} needs each slice's place in its series: add a `slice` column (its number along "
                         "the head) and, unless each patient has one series, a `series` column to data.labels.")


def memory_budget() -> int:
    """Bytes of decoded slices kept in memory rather than read every epoch: an eighth of the RAM, at most 4 GB."""
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 0
    return min(4 << 30, physical // 8)


def resolve_workers(num_workers: int | str, devices: int = 1, on_cpu: bool = False) -> int:
    """DataLoader processes for `data.num_workers`. `auto` shares the usable cores among the GPUs, at most 8
    each; training on the CPU gets one: the model's threads need the cores, and one worker reading, windowing
    and augmenting keeps ahead of a CPU-trained model by far (see docs/explanation/speed.md)."""
    if num_workers != "auto":
        return int(num_workers)
    if on_cpu:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cores // max(1, devices)))


class ICHDataModule(pl.LightningDataModule):
    """Data for one task from one source, or from several (`source="multi"`: one data module per source of
    `sources`, read into one index); every argument is a `data.*` key of the config (see conf/data)."""

    def __init__(
        self,
        task: str = "binary",
        label: str | None = None,
        source: str = "phantom",
        root: str | None = None,
        image_dir: str | None = None,
        labels: str | None = None,
        cache_dir: str = "~/.cache/ich",
        cache: bool = False,
        windows: list = ("brain", "subdural", "bone"),
        context: int = 0,
        image_size: int = 256,
        min_brain_fraction: float = 0.0,
        split: list[float] = (0.7, 0.15, 0.15),
        split_file: str | None = None,
        seed: int = 0,
        balance: str = "none",
        balance_ratio: float = 1.0,
        batch_size: int = 16,
        num_workers: int | str = "auto",
        pin_memory: bool | str = "auto",
        augment: dict | None = None,
        phantom: dict | None = None,
        modalities: list[str] = ("CT",),
        masks: str | None = None,
        mask_labels: dict | None = None,
        min_mask_pixels: int = 0,
        label_columns: dict | None = None,
        first_slice: int = 1,
        patient_pattern: str | None = None,
        encoding: str = "none",
        encoding_window: object = None,
        hu_scale: float = 1.0,
        hu_offset: float = 0.0,
        hu_clip: list[float] | None = None,
        sources: dict | None = None,
        test_sources: list[str] = (),
        balance_sources: bool = False,
        output_dir: str | None = None,
    ):
        super().__init__()
        if source not in (*SOURCES, "multi"):
            raise ValueError(f"Unknown data.source '{source}': choose data=phantom, data=rsna, data=images, data=nifti "
                             "or data=multi.")
        if source != "multi" and (test_sources or balance_sources):
            raise ValueError("data.test_sources and data.balance_sources are about the sources of data=multi: pick "
                             "data=multi with data.sources, or leave them out.")
        if source not in ("phantom", "multi") and not root:
            raise ValueError(f"data={source} needs data.root=DIR, the folder that holds the dataset.")
        if balance not in ("none", "undersample"):
            raise ValueError(f"Unknown data.balance '{balance}': use none or undersample.")
        if source == "images" and cache:
            raise ValueError("data.cache holds DICOM slices; PNG/JPG folders are read as they are: set data.cache=false.")
        self.encoding = ImageEncoding.from_config(encoding, encoding_window, hu_scale, hu_offset, hu_clip)
        if source != "images" and (self.encoding.kind != "none" or hu_clip is not None):
            raise ValueError(f"data.encoding and data.hu_* describe PNG/JPG folders (data=images); data={source} says "
                             "how its pixels become HU in its files: leave them out.")
        if not (num_workers == "auto" or isinstance(num_workers, int) and num_workers >= 0):
            raise ValueError(f"data.num_workers={num_workers!r}: give a number of processes (0 = none) or auto.")
        if not (pin_memory == "auto" or isinstance(pin_memory, bool)):
            raise ValueError(f"data.pin_memory={pin_memory!r}: use true, false or auto (true when CUDA is available).")
        self.task = get_task(task, label)
        self.source, self.image_dir, self.labels = source, image_dir, labels
        self.root = Path(root).expanduser() if root else None
        self.cache_dir = Path(cache_dir).expanduser()
        self.cache = bool(cache)
        self.windows = tuple(parse_windows(windows))
        self.context, self.image_size, self.min_brain_fraction = int(context), int(image_size), float(min_brain_fraction)
        self.split, self.split_file, self.seed = tuple(split), split_file, int(seed)
        self.balance, self.balance_ratio = balance, float(balance_ratio)
        self.batch_size, self.num_workers, self.pin_memory = int(batch_size), num_workers, pin_memory
        self.augment = dict(augment or {})
        self.site_augmentation = SiteAugmentation.from_config(self.augment)
        self.phantom = dict(phantom or {})
        self.modalities = tuple(modalities)
        self.volumes = None if source != "nifti" else VolumeSource(
            self.root / (image_dir or ""), self.root / labels if labels else None, self.root / masks if masks else None,
            dict(mask_labels or {}), int(min_mask_pixels), dict(label_columns or {}), int(first_slice), patient_pattern)
        self.output_dir = Path(output_dir) if output_dir else None
        self.test_sources, self.balance_sources = tuple(test_sources or ()), bool(balance_sources)
        # data=multi: one data module per source, each indexing and reading its slices as it would alone
        self.parts: dict[str, ICHDataModule] = {}
        if source == "multi":
            shared = dict(cache_dir=cache_dir, cache=cache, windows=windows, context=context, image_size=image_size,
                          modalities=modalities, augment=augment)
            self.parts = {name: ICHDataModule(task=task, label=label, **config)
                          for name, config in source_configs(sources, shared).items()}
            self._adopt_inputs()
        self._images = source == "images" or bool(self.parts) and all(p.source == "images" for p in self.parts.values())
        self.datasets: dict[str, SliceDataset] = {}
        self.tables: dict[str, pd.DataFrame] = {}
        self.summary: dict = {}
        self._index: pd.DataFrame | None = None  # every usable slice of the source, read once a run
        self._slice_cache: SliceCache | None = None

    def _adopt_inputs(self) -> None:
        """The inputs every source makes alike (or a refusal naming the key that differs), as this module's own."""
        made = {name: {"windows": None if part.model_windows is None else window_pairs(part.model_windows),
                       "context": part.context, "image size": part.image_size}
                for name, part in self.parts.items()}
        windowed = [part.encoding.kind for part in self.parts.values() if part.source == "images"]
        key = "windows" if all(kind == "hu" for kind in windowed) else "encoding_window"
        check_same_inputs(made, {"windows": key, "context": "context", "image size": "image_size"})
        first = next(iter(self.parts.values()))
        self.windows, self.context, self.image_size = first.windows, first.context, first.image_size
        if all(part.source == "images" for part in self.parts.values()):
            self.encoding = first.encoding

    # -- what the model needs to know about its inputs --------------------------------------------
    @property
    def inputs(self) -> dict:
        """How a slice becomes the model's input, which Modality values were read as CT slices, and what the model
        was trained on: saved in checkpoints (ich.training.module), so that evaluation and prediction shape and admit
        new data exactly as training did, refuse data options that contradict it, and say where the model comes from
        and which studies lie outside what it saw (ich.data.seen)."""
        windows = self.model_windows
        return {
            "source": "images" if self._images else "dicom",
            # how the training pixels relate to HU (ich.data.encoding): hu for DICOM and NIfTI; what decides is `windows`
            "encoding": self.encoding.kind if self._images else "hu",
            "windows": None if windows is None else window_pairs(windows),
            "context": self.context,
            "image_size": self.image_size,
            "channels": self.num_channels,
            "modalities": list(self.modalities),
            # slices with less brain than this are no test slices, so they count in no exam (ich.evaluation.exam)
            "min_brain_fraction": 0.0 if self._images else self.min_brain_fraction,
            # what every report names first, and the ranges a new study's series are compared with (ich.data.seen)
            "trained_on": trained_on(self.source, self.phantom,
                                     {name: trained_on(part.source, part.phantom) for name, part in self.parts.items()}),
            "seen": self.seen,
        }

    @property
    def seen(self) -> dict:
        """The figures of the training patients' series (ich.data.seen.seen_ranges), over every slice of them as
        indexed, whichever slices the task and the filters keep for training: a new series is read whole too. After
        setup. Image folders give none: no HU, no field of view, and their `slice` column counts slices, not mm."""
        index = self._full_index()
        if self._images:
            return seen_ranges(pd.DataFrame())
        training = index[index["patient"].isin(self.tables["train"]["patient"])]
        return seen_ranges(series_figures(training))

    @property
    def model_windows(self) -> tuple[Window, ...] | None:
        """The windows the model's planes are made with: data.windows over HU (DICOM, NIfTI, data.encoding=hu), the
        images' own with data.encoding=window, None when they are unknown (data.encoding=none). What a model trained
        here applies to any HU source later (ich.inference.deploy). Several sources make the same (checked)."""
        if self.parts:
            return next(iter(self.parts.values())).model_windows
        if self.source != "images" or self.encoding.kind == "hu":
            return self.windows
        return self.encoding.windows or None

    # -- the full table of usable slices --------------------------------------------------------
    def _dicom_root(self) -> Path:
        if self.source == "phantom":
            return ensure_phantom(self.cache_dir, self.phantom)
        if not self.root.is_dir():
            where = "dataset" if self.volumes else "RSNA download"
            raise FileNotFoundError(f"data.root={self.root} does not exist: point it at the {where} folder.")
        return self.root

    def _full_index(self) -> pd.DataFrame:
        """Every slice of the source that has a file and labels, in index order (row i = slice-cache row i)."""
        if self._index is None:
            if self.parts:
                self._index = combine_indices({name: part._full_index() for name, part in self.parts.items()})
                self.summary["skipped"] = {f"{name}/{reason}": count for name, part in self.parts.items()
                                           for reason, count in part.summary.get("skipped", {}).items()}
            elif self.source == "images":
                self._index = self._image_table()
            else:
                self._index, summary, _ = self.build_index()
                self.summary["skipped"] = dict(summary.skipped)
        return self._index

    def build_index(self, force: bool = False, workers: int | None = None) -> tuple[pd.DataFrame, IndexSummary, Path]:
        """The header index of a DICOM source, or of the slices of NIfTI volumes (written on first use, reused after)."""
        root = self._dicom_root()
        if self.volumes is not None:
            self.volumes.check_labels(self.task.outputs)
            return self.volumes.index(self.cache_dir, workers, force)
        labels_csv = find_rsna_labels(root)
        images = find_rsna_images(root, self.image_dir)
        return load_or_build_index(images, labels_csv, read_rsna_labels, self.cache_dir, workers, force, self.modalities)

    def build_cache(self, index: pd.DataFrame | None = None, workers: int | None = None) -> SliceCache:
        """The slice cache of a DICOM source's index at data.image_size (converted on first use, finished if cut short)."""
        return load_or_build_cache(self._full_index() if index is None else index, self.cache_dir, self.image_size, workers)

    def _image_table(self) -> pd.DataFrame:
        table = read_image_table(self.root, Path(self.labels).expanduser(), self.task.outputs)
        for column in ("patient", "series", "study"):
            if column in table:
                table[column] = [pseudonym(value) for value in table[column]]
        exists = np.array([Path(p).is_file() for p in table["path"]])
        missing = table.loc[~exists, "filename"]
        if len(missing):
            log.warning("Skipped %d labelled images with no file: %s", len(missing), ", ".join(missing.head(10)))
        self.summary["skipped"] = {"missing_file": int(len(missing))}
        table = table[exists].reset_index(drop=True)
        if "position" in table:  # a `slice` column: each series together, in slice order, as a DICOM index
            table = add_slice_order(table)
        if self.context:
            check_slice_order(table, f"data.context={self.context}")
        return table

    def prepare_data(self) -> None:
        """Write or check the phantom, the index and the slice cache; once a run, however often Lightning calls."""
        for part in self.parts.values():  # several sources: each writes its own, and the index joins them at setup
            part.prepare_data()
        if self.parts or self.source == "images" or self._index is not None:
            return
        index = self._full_index()
        if self.cache:
            self._slice_cache = self.build_cache(index)

    # -- stages ---------------------------------------------------------------------------------
    def _stages(self, table: pd.DataFrame) -> pd.Series:
        if self.split_file is None:
            if self.parts:
                stages = split_by_source(table, self.split, self.seed, self.test_sources)
            else:
                stages = split_by_patient(table, self.split, self.seed)
            if self.output_dir is not None:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                columns = ["image_id", "patient", "split", *(["source"] if self.parts else [])]
                table.assign(split=stages)[columns].to_csv(self.output_dir / "split.csv", index=False)
            return stages
        saved = pd.read_csv(self.split_file, dtype=str).set_index("image_id")["split"]
        stages = table["image_id"].map(saved)
        if stages.isna().all():
            raise ValueError(f"None of the slices of this dataset appear in {self.split_file}: is it the same data?")
        return stages

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        index = self._full_index()
        loader = self._loader(index)
        neighbours = neighbour_rows(index, self.context)
        image_ids = as_bytes(index["image_id"])
        table = index.assign(row=np.arange(len(index)))
        if not self._images and self.min_brain_fraction > 0:
            blank = table["brain_fraction"] < self.min_brain_fraction
            self.summary.setdefault("skipped", {})["little_brain"] = int(blank.sum())
            table = table[~blank]
            if table.empty:
                raise ValueError(
                    f"No slices left: data.min_brain_fraction={self.min_brain_fraction} dropped all {len(index)}; lower it."
                )
        table = table.assign(split=self._stages(table))
        table = table[task_rows(table, self.task) & table["split"].notna()]
        if table.empty:
            raise ValueError(f"No slices left for task={self.task.name} after filtering; check data.min_brain_fraction.")
        augmentation = build_augmentation(**windowed_augment(self.augment))
        for name in STAGES:
            part = table[table["split"] == name]
            if name == "train" and self.balance == "undersample":
                # subtype balances its five classes, binary its one label, multilabel `any`
                classes = task_targets(part, self.task) if self.task.loss == "ce" else part[self.task.outputs[0]].to_numpy()
                part = undersample(part, classes, self.balance_ratio, self.seed)
            if name == "train" and self.balance_sources:
                part = equal_sources(part, self.seed)
            self.tables[name] = part.reset_index(drop=True)
            rows = part["row"].to_numpy()
            self.datasets[name] = SliceDataset(
                neighbours[rows],
                task_targets(part, self.task),
                image_ids[rows],
                loader,
                transform=augmentation if name == "train" else None,
                seed=self.seed,
                site=self.site_augmentation if name == "train" else None,
            )
        self.summary.update(
            slices_found=len(index),
            slices={name: len(ds) for name, ds in self.datasets.items()},
            patients={name: int(self.tables[name]["patient"].nunique()) for name in STAGES},
        )
        if self.parts:
            self.summary["sources"] = {name: self.tables[name]["source"].value_counts().to_dict() for name in STAGES}
        if self._slice_cache is not None and self._slice_cache.failed:
            self.summary["failed_in_cache"] = len(self._slice_cache.failed)
        log.info("Data: %s", json.dumps(self.summary))

    def _loader(self, index: pd.DataFrame):
        """What turns an index row into windowed planes: the slice cache, or the DICOM or image file; read
        once into memory when all slices fit in a small share of it (see MemoryLoader): as HU under site
        augmentation, which changes HU before windowing, else as planes. Several sources: each source's own loader
        for its rows."""
        if self.parts:
            lengths = [len(part.index) for part in self.parts.values()]
            loaders = [part._loader(part.index) for part in self.parts.values()]
            check_same_inputs({name: {"channels": loader.channels} for name, loader in zip(self.parts, loaders)},
                              {"channels": "encoding_window"})
            return SourceLoaders(tuple(loaders), starts_of(lengths))
        if self.cache:
            self._slice_cache = self._slice_cache or self.build_cache(index)
            return CacheLoader(self._slice_cache, self.windows)
        if self.source != "images":
            loader = DicomLoader(as_bytes(index["path"]), self.windows, self.image_size)
        else:
            loader = self._image_loader(index["path"])
        keep_hu = self.site_augmentation is not None and loader.windows is not None
        needed = len(index) * (2 if keep_hu else loader.channels) * self.image_size**2
        if needed > memory_budget():
            return loader
        log.info("Reading the %d slices into memory once (%.0f MB%s) instead of every epoch", len(index), needed / 1e6,
                 ", as HU for the site augmentation" if keep_hu else "")
        return MemoryLoader(loader, len(index), self.image_size, keep_hu=keep_hu)

    def _image_loader(self, paths: pd.Series):
        """HU images are windowed as DICOMs are; windowed images are read as they are, with as many channels as
        their declared windows (data.encoding=window) or as the first image has."""
        first = cv2.imread(paths.iloc[0], cv2.IMREAD_UNCHANGED)
        if self.encoding.kind == "hu":
            if first is not None:
                self.encoding.check_windows(self.windows, first.dtype)
            return HUImageLoader(as_bytes(paths), self.encoding, self.windows, self.image_size)
        colours = 1 if first is None or first.ndim == 2 else 3
        channels = len(self.encoding.windows) or colours
        if channels > colours:
            raise ValueError(f"data.encoding_window lists {channels} windows, one per colour channel, but "
                             f"{paths.iloc[0]} is grayscale: give the one window its images were made with.")
        return ImageLoader(as_bytes(paths), self.image_size, channels)

    @property
    def index(self) -> pd.DataFrame:
        """Every usable slice of the source, in index order: each series together, in slice order."""
        return self._full_index()

    def every_slice(self) -> SliceDataset:
        """Every slice of the index in index order, as the test stage reads them (no augmentation), whichever
        slices the task and the filters keep: what a second stage embeds (ich.training.embeddings). After setup."""
        index = self._full_index()
        loader = self.datasets["test"].loader  # every stage reads through the same loader
        return SliceDataset(neighbour_rows(index, self.context), task_targets(index, self.task),
                            as_bytes(index["image_id"]), loader)

    # -- what the model needs to know -----------------------------------------------------------
    @property
    def num_channels(self) -> int:
        # the first stage that has slices: under external validation train and val are empty
        return next(ds.channels for ds in self.datasets.values() if len(ds))

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.task.outputs

    def pos_weight(self) -> list[float]:
        """BCE pos_weight per output: negatives over positives on the training split."""
        targets = self.datasets["train"].targets
        positives = targets.sum(axis=0)
        return ((len(targets) - positives) / np.maximum(positives, 1)).tolist()

    def class_weights(self) -> list[float]:
        """Cross-entropy weights inversely proportional to class frequency on the training split."""
        counts = np.bincount(self.datasets["train"].targets, minlength=self.task.num_outputs)
        return (counts.sum() / (self.task.num_outputs * np.maximum(counts, 1))).tolist()

    @classmethod
    def from_config(cls, cfg: DictConfig, **overrides) -> "ICHDataModule":
        """The data module of a composed config (`data`, `task`, `output_dir`); `overrides` replace data keys."""
        data = OmegaConf.to_container(cfg.data, resolve=True)
        return cls(task=cfg.task.name, label=cfg.task.get("label"), output_dir=cfg.get("output_dir"),
                   **{**data, **overrides})

    # -- loaders --------------------------------------------------------------------------------
    def loader(self, dataset: SliceDataset, shuffle: bool = False) -> DataLoader:
        """A DataLoader over `dataset` (a stage's, or a subset of one) as training reads it: workers, batch
        size, seeded epoch shuffling, unreadable slices skipped."""
        trainer = self.trainer
        on_cpu = trainer is None and not torch.cuda.is_available() or trainer is not None and trainer.strategy.root_device.type == "cpu"
        workers = resolve_workers(self.num_workers, trainer.num_devices if trainer is not None else 1, on_cpu)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffle(dataset, self.seed) if shuffle else None,
            num_workers=workers,
            pin_memory=torch.cuda.is_available() if self.pin_memory == "auto" else self.pin_memory,
            persistent_workers=workers > 0,
            worker_init_fn=init_worker,
            collate_fn=collate_skipping,
            drop_last=shuffle and len(dataset) > self.batch_size,
        )

    def train_dataloader(self) -> DataLoader:
        return self.loader(self.datasets["train"], shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.datasets["val"])

    def test_dataloader(self) -> DataLoader:
        return self.loader(self.datasets["test"])

    def predict_dataloader(self) -> DataLoader:
        return self.loader(self.datasets["test"])

    def folder_index(self, folder: str | Path) -> pd.DataFrame:
        """The header index of a folder of unlabelled DICOMs (nested folders too), built on first use."""
        return load_or_build_index(Path(folder).expanduser(), None, None, self.cache_dir, modalities=self.modalities)[0]

    def folder_dataset(self, index: pd.DataFrame, ids: np.ndarray | None = None) -> SliceDataset:
        """The slices of a folder index with this module's preprocessing; targets are zeros. Each is reported by
        its image id, or by `ids` where file names repeat across series (CQ500's do)."""
        shape = (len(index),) if self.task.loss == "ce" else (len(index), self.task.num_outputs)
        zeros = np.zeros(shape, np.int64 if self.task.loss == "ce" else np.float32)
        windows = self.model_windows
        if windows is None:
            raise ValueError("DICOMs are windowed with the model's windows, and images of an unknown window "
                             "(data.encoding=none) give it none: train on them with data.encoding=window "
                             "data.encoding_window=[CENTRE,WIDTH], the window they were made with.")
        loader = DicomLoader(as_bytes(index["path"]), windows, self.image_size)
        ids = as_bytes(index["image_id"] if ids is None else ids)
        return SliceDataset(neighbour_rows(index, self.context), zeros, ids, loader)

    def folder_dataloader(self, folder: str | Path) -> DataLoader:
        """Unlabelled DICOMs (e.g. Kaggle's stage_2_test/) with this module's preprocessing; targets are zeros."""
        return self.loader(self.folder_dataset(self.folder_index(folder)))
