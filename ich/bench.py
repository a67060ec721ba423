"""`python -m ich.bench`: measured speed of each stage, from a DICOM file to trained images per second.

Not a test: run it on the machine whose figures you want; it prints a table and writes JSON.

    python -m ich.bench --out bench.json                                   # CPU: a few minutes
    python -m ich.bench --backbone densenet121 --peak-tflops 989 --out gpu.json   # on a GPU
    python -m ich.bench --scale                                            # also the RSNA-scale memory figures

Per-core figures pin the process to one core with one thread per library, with glibc told to reuse
freed memory as DataLoader workers are (ich.data.dataset.reuse_freed_memory): every way is measured
alike, without the page faults that otherwise make the figures swing by up to 2x from run to run.
Inputs are phantom slices (512x512, 16-bit, uncompressed) written to a temporary folder, so files
come from the page cache: the figures are CPU cost, not disk speed.
"""

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from typing import Any

import cv2
import numpy as np
import pandas as pd
import pydicom
import pytorch_lightning as pl
import timm
import torch
from omegaconf import OmegaConf
from pydicom import config as pydicom_config
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from ich import CONFIG_DIR
from ich.core.hardware import resolve_trainer
from ich.core.privacy import pseudonym
from ich.core.results import write_atomic
from ich.core.tasks import LABELS
from ich.data.augment import SiteAugmentation, build_augmentation, windowed_augment
from ich.data.cache import SliceCache, load_or_build_cache
from ich.data.datamodule import ICHDataModule, resolve_workers
from ich.data.dataset import (CacheLoader, DicomLoader, EpochShuffle, SliceDataset, as_bytes, collate_skipping,
                              init_worker, reuse_freed_memory)
from ich.data.dicom import read_hu_square
from ich.data.index import INDEX_VERSION, IndexSummary, file_stamp, index_dir
from ich.data.phantom import generate_images
from ich.data.windows import WINDOWS, parse_windows, window_stack

WINDOW_NAMES = ("brain", "subdural", "bone")
BENCH_WINDOWS = tuple(parse_windows(list(WINDOW_NAMES)))
SLICES_PER_SERIES = 20
RSNA_SLICES = 752_803  # stage 2 training set
RSNA_SERIES, RSNA_PATIENTS = 21_744, 18_938
# Per-slice prevalence of the subtypes in RSNA 2019 (DOMAIN.md), for a synthetic index of that scale;
# `any` is their OR there, as in RSNA (about 18% when drawn independently, against RSNA's 14.4%).
RSNA_PREVALENCE = {"epidural": 0.004, "intraparenchymal": 0.048, "intraventricular": 0.035,
                   "subarachnoid": 0.048, "subdural": 0.063}
TARGETS = {"dicom_vs_naive": 4.0, "cache_vs_dicom": 10.0, "real_vs_random": 0.9,
           "ich_vs_plain_images": 0.9, "ich_vs_plain_dicom_cache": 0.9}
SCALE_TARGETS = {"setup_s": 15.0, "worker_rss_growth_mb": 64.0}  # at most, on the 2-core development machine


def naive(path: Path, size: int) -> np.ndarray:
    """What most public notebooks do: float64 HU, window at full size, resize each channel, float32 out."""
    # Validation off as in ich: the phantom's RSNA-style "ID_..." UIDs would make every read pay for a warning.
    with pydicom_config.disable_value_validation():
        ds = pydicom.dcmread(path)
        hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    channels = []
    for name in WINDOW_NAMES:
        center, width = WINDOWS[name]
        channels.append(cv2.resize(np.clip((hu - (center - width / 2)) / width, 0, 1), (size, size)))
    return np.stack(channels, axis=-1).astype(np.float32)


def images_per_second(work: Callable[[], int], min_seconds: float) -> float:
    """Run `work` (which returns how many images it handled) until min_seconds have passed."""
    images, start = 0, time.perf_counter()
    while True:
        images += work()
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return images / elapsed


def interleaved(ways: dict[str, Callable[[], int]], repeats: int, min_seconds: float) -> dict[str, list[float]]:
    """Rates of each way, repeats interleaved so that a drift in machine load hits every way alike."""
    for work in ways.values():
        work()  # warm-up: page cache, lazy imports, decoder plugins
    rates: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(repeats):
        for name, work in ways.items():
            rates[name].append(images_per_second(work, min_seconds))
    return rates


def each(read: Callable, keys: list) -> Callable[[], int]:
    """One pass of `read` over `keys`."""

    def work() -> int:
        for key in keys:
            read(key)
        return len(keys)

    return work


def batches_of(dataset: SliceDataset, batch_size: int) -> Callable[[], int]:
    """One pass over a dataset the way a DataLoader worker does it in training: items keyed by
    (epoch, index) as EpochShuffle hands them out, so augmentation is seeded per slice; then the batch."""

    def work() -> int:
        for start in range(0, len(dataset), batch_size):
            collate_skipping([dataset[(0, i)] for i in range(start, min(start + batch_size, len(dataset)))])
        return len(dataset)

    return work


def default_augment_config() -> dict:
    """data.augment as conf/data/_common.yaml sets it."""
    return OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "data" / "_common.yaml").augment)


def default_augmentation():
    """The training augmentation with the strengths of conf/data/_common.yaml."""
    return build_augmentation(**windowed_augment(default_augment_config()))


def default_site_augmentation() -> SiteAugmentation:
    """The site augmentation (data.augment.site=true) with the strengths of conf/data/_common.yaml."""
    return SiteAugmentation.from_config({**default_augment_config(), "site": True})


@contextlib.contextmanager
def one_core() -> Iterator[None]:
    """Pin the process to one core with one thread in torch and OpenCV, then restore both."""
    cores, torch_threads, cv2_threads = os.sched_getaffinity(0), torch.get_num_threads(), cv2.getNumThreads()
    os.sched_setaffinity(0, {min(cores)})
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        os.sched_setaffinity(0, cores)
        torch.set_num_threads(torch_threads)
        cv2.setNumThreads(cv2_threads)


def phantom_index(workdir: Path, slices: int, dicom_size: int) -> pd.DataFrame:
    """Write `slices` phantom DICOMs (whole series) and index them."""
    phantom = {"patients": math.ceil(slices / SLICES_PER_SERIES), "slices": SLICES_PER_SERIES,
               "size": dicom_size, "seed": 0, "quirks": False}
    index, _, _ = ICHDataModule(source="phantom", cache_dir=str(workdir), phantom=phantom).build_index()
    return index.head(slices).reset_index(drop=True)


def per_core(index: pd.DataFrame, cache: SliceCache, args: argparse.Namespace) -> dict[str, list[float]]:
    """Images/s on one core: DICOM to a 3-window tensor (naive and ich), then the loaders with and without augmentation,
    and the slice cache's with the site augmentation on top (data.augment.site=true; its cost per image is the
    difference of the inverse rates)."""
    windows = BENCH_WINDOWS
    paths = index["path"].tolist()
    dicom = DicomLoader(as_bytes(paths), windows, args.size)
    augment = default_augmentation()
    targets = np.zeros((len(paths), 1), np.float32)
    ids, rows = as_bytes(index["image_id"]), np.arange(len(paths))
    datasets = {
        "loader_dicom": SliceDataset(rows, targets, ids, dicom),
        "loader_dicom_augmented": SliceDataset(rows, targets, ids, dicom, augment),
        "loader_cache": SliceDataset(rows, targets, ids, CacheLoader(cache, windows)),
        "loader_cache_augmented": SliceDataset(rows, targets, ids, CacheLoader(cache, windows), augment),
        "loader_cache_site_augmented": SliceDataset(rows, targets, ids, CacheLoader(cache, windows), augment,
                                                    site=default_site_augmentation()),
    }
    ways = {
        "dicom_naive": each(lambda path: naive(Path(path), args.size), paths),
        "dicom_ich": each(lambda path: window_stack(read_hu_square(path, args.size), windows), paths),
    }
    ways.update({name: batches_of(dataset, args.batch_size) for name, dataset in datasets.items()})
    with one_core():
        return interleaved(ways, args.repeats, args.min_seconds)


def site_cost_ms(rates: dict[str, list[float]]) -> float:
    """What the site augmentation adds per image on one core, in ms: the augmented slice-cache loader with it and
    without it, each at its median rate."""
    names = ("loader_cache_site_augmented", "loader_cache_augmented")
    with_site, without = (statistics.median(rates[name]) for name in names)
    return round(1000 / with_site - 1000 / without, 2)


def model_speed(args: argparse.Namespace, device: torch.device, loader: DataLoader | None) -> dict:
    """Training and inference images/s of the backbone on random tensors, FLOPs per image, and with
    `loader`, training images/s on real batches next to the same steps on tensors already on the device."""
    from ich.training.module import ICHLitModule

    bf16 = args.precision == "bf16-mixed"
    module = ICHLitModule(task="binary", backbone=args.backbone, channels_last=device.type == "cuda").to(device)
    forward_flops, train_flops = count_flops(module, args.size)
    if args.compile:
        module.backbone.compile()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    images = torch.rand(args.batch_size, 3, args.size, args.size, device=device)
    target = (torch.rand(args.batch_size, 1, device=device) > 0.5).float()

    def train_step(x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = module.criterion(module(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def infer_step() -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            module(images)

    module.train()
    train_rate = timed_steps(lambda: train_step(images, target), args, device)
    module.eval()
    infer_rate = timed_steps(infer_step, args, device)
    result = {
        "backbone": args.backbone, "size": args.size, "precision": args.precision, "batch_size": args.batch_size,
        "device": device_name(device), "threads": torch.get_num_threads(), "compile": args.compile,
        "train_images_per_s": round(train_rate, 2), "infer_images_per_s": round(infer_rate, 2),
        "forward_gflops_per_image": round(forward_flops / 1e9, 3), "train_gflops_per_image": round(train_flops / 1e9, 3),
        "train_tflops_per_s": round(train_rate * train_flops / 1e12, 4),
        "infer_tflops_per_s": round(infer_rate * forward_flops / 1e12, 4),
    }
    if args.peak_tflops:
        result["peak_tflops"] = args.peak_tflops
        result["train_peak_fraction"] = round(result["train_tflops_per_s"] / args.peak_tflops, 4)
        result["infer_peak_fraction"] = round(result["infer_tflops_per_s"] / args.peak_tflops, 4)
    if loader is not None:
        module.train()
        batches = endless(loader)

        def real_step() -> None:
            batch = next(batches)
            train_step(batch["image"].to(device, non_blocking=True), batch["target"].to(device, non_blocking=True))

        real_rate = timed_steps(real_step, args, device)
        random_rate = timed_steps(lambda: train_step(images, target), args, device)
        result["loader_vs_random"] = {
            "workers": loader.num_workers, "real_images_per_s": round(real_rate, 2),
            "random_images_per_s": round(random_rate, 2), "ratio": round(real_rate / random_rate, 3),
        }
    return result


def count_flops(module: torch.nn.Module, size: int) -> tuple[float, float]:
    """FLOPs per image of a forward pass and of a training step (forward and backward), counted on two images.

    Two, because BatchNorm refuses one image in training mode; convolution FLOPs are linear in the batch.
    """
    image = torch.rand(2, 3, size, size, device=next(module.parameters()).device)
    with FlopCounterMode(display=False) as forward:
        with torch.no_grad():
            module(image)
    with FlopCounterMode(display=False) as train:
        module(image).sum().backward()
    module.zero_grad(set_to_none=True)
    return forward.get_total_flops() / 2, train.get_total_flops() / 2


def timed_steps(step: Callable[[], None], args: argparse.Namespace, device: torch.device) -> float:
    """Images/s over args.steps steps after args.warmup untimed ones (compilation, cuDNN autotuning)."""
    for _ in range(args.warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    return args.steps * args.batch_size / (time.perf_counter() - start)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def endless(loader: DataLoader) -> Iterator[dict]:
    while True:
        yield from loader


def training_loader(cache: SliceCache, index: pd.DataFrame, args: argparse.Namespace, device: torch.device) -> DataLoader:
    """The training DataLoader over the cache, as `trainer=gpu data.cache=true` builds it."""
    targets = (np.arange(len(index)) % 2).astype(np.float32)[:, None]
    loader = CacheLoader(cache, BENCH_WINDOWS)
    dataset = SliceDataset(np.arange(len(index)), targets, as_bytes(index["image_id"]), loader, default_augmentation())
    workers = resolve_workers(args.loader_workers)
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                      worker_init_fn=init_worker, collate_fn=collate_skipping, drop_last=True)


# --- the framework against a plain loop: same model, size, precision, batch and steps -------------------


class StepTimer(pl.Callback):
    """Wall time from the start of training batch `warmup` to the end of fit."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.started, self.elapsed = warmup, None, None

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.warmup and self.started is None:
            self.started = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.elapsed = time.perf_counter() - self.started


def ich_vs_plain(datamodule: ICHDataModule, args: argparse.Namespace, precision: str, channels_last: bool) -> dict:
    """Training images/s through ich (this data module, ICHLitModule, Lightning's loop) and through a plain
    loop over the same training slices already in memory as float tensors, unaugmented; and their ratio."""
    from ich.training.module import ICHLitModule

    steps, warmup, batch = args.vs_plain_steps, args.warmup, datamodule.batch_size
    bf16 = precision == "bf16-mixed"
    layout = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    module = ICHLitModule(task="binary", backbone=args.backbone, in_chans=datamodule.num_channels,
                          channels_last=channels_last)
    timer = StepTimer(warmup)
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=warmup + steps,
                         limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
    trainer.fit(module, datamodule=datamodule)
    ich_rate = steps * batch / timer.elapsed

    train = datamodule.datasets["train"].subset(np.arange(len(datamodule.datasets["train"])))
    images = torch.stack([train[i]["image"] for i in range(len(train))]).float().div_(255)
    targets = torch.as_tensor(train.targets, dtype=torch.float32)
    model = timm.create_model(args.backbone, num_classes=1, in_chans=images.shape[1]).to(memory_format=layout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    order = torch.randperm(len(images)).repeat(math.ceil((warmup + steps) * batch / len(images)))

    def plain_step(step: int) -> None:
        rows = order[step * batch : (step + 1) * batch]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(images[rows].contiguous(memory_format=layout))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), targets[rows])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    for step in range(warmup):
        plain_step(step)
    start = time.perf_counter()
    for step in range(warmup, warmup + steps):
        plain_step(step)
    plain_rate = steps * batch / (time.perf_counter() - start)
    return {"ich_images_per_s": round(ich_rate, 2), "plain_images_per_s": round(plain_rate, 2),
            "ratio": round(ich_rate / plain_rate, 3), "workers": resolve_workers(datamodule.num_workers, on_cpu=True),
            "threads": torch.get_num_threads(), "steps": steps, "batch_size": batch, "precision": precision,
            "channels_last": channels_last, "backbone": args.backbone, "size": datamodule.image_size}


def vs_plain(workdir: Path, args: argparse.Namespace) -> dict:
    """`train/ich_vs_plain` from an image folder and from the DICOM slice cache, at the trainer's precision."""
    trainer = resolve_trainer({"accelerator": "cpu", "precision": "auto", "channels_last": "auto"})
    common = dict(task="binary", cache_dir=str(workdir), image_size=args.vs_plain_size, batch_size=16,
                  num_workers=args.loader_workers, seed=0)
    generate_images(workdir / "pngs", patients=args.vs_plain_patients, slices=12, size=args.dicom_size, seed=0)
    phantom = {"patients": args.vs_plain_patients, "slices": 12, "size": args.dicom_size, "seed": 0, "quirks": False}
    sources = {
        "images": ICHDataModule(source="images", root=str(workdir / "pngs"), labels=str(workdir / "pngs" / "labels.csv"),
                                **common),
        "dicom_cache": ICHDataModule(source="phantom", phantom=phantom, cache=True, **common),
    }
    result = {}
    for name, datamodule in sources.items():
        datamodule.prepare_data()
        datamodule.setup()
        result[name] = ich_vs_plain(datamodule, args, trainer["precision"], trainer["channels_last"])
    return result


# --- RSNA scale: setup time and memory of the data module on an index of 752,803 slices ------------------


def synthetic_rsna(root: Path, cache_dir: Path, slices: int, series: int, seed: int = 0) -> np.ndarray:
    """An RSNA layout under `root` whose index in `cache_dir` is fresh: `slices` rows in `series` series of
    about RSNA's patients per series, labels at RSNA's prevalence, and no pixels (the files do not exist).

    The label file and the image folder are empty stand-ins: a fresh index is the only thing setup reads.
    """
    rng = np.random.default_rng(seed)
    images, labels_csv = root / "stage_2_train", root / "stage_2_train.csv"
    images.mkdir(parents=True)
    labels_csv.write_text("ID,Label\n")
    lengths = np.full(series, slices // series)
    lengths[: slices - lengths.sum()] += 1
    series_of = np.repeat(np.arange(series), lengths)
    patient_of = (np.arange(series) * RSNA_PATIENTS // RSNA_SERIES)[series_of]
    first = np.repeat(np.cumsum(lengths) - lengths, lengths)
    ids = [f"ID_{i:09x}" for i in rng.choice(16**9, slices, replace=False)]
    index = pd.DataFrame({
        "image_id": ids,
        "path": [f"{images}/{i}.dcm" for i in ids],
        "patient": [pseudonym(f"patient{p}") for p in patient_of],
        "study": [pseudonym(f"study{s}") for s in series_of],
        "series": [pseudonym(f"series{s}") for s in series_of],
        "position": (np.arange(slices) - first) * 5.0,
        "window_center": 40.0, "window_width": 80.0, "bits_stored": 12, "pixel_representation": 0,
        "rows": 512, "columns": 512,
        "brain_fraction": rng.random(slices).astype(np.float64),
        **{name: (rng.random(slices) < rate).astype(np.int8) for name, rate in RSNA_PREVALENCE.items()},
        "slice_index": (np.arange(slices) - first).astype(np.int32),
        "series_length": lengths[series_of].astype(np.int32),
    })
    index.insert(index.columns.get_loc("epidural"), "any", index[list(LABELS[1:])].to_numpy().any(axis=1).astype(np.int8))
    folder = index_dir(cache_dir, images, labels_csv)
    folder.mkdir(parents=True)
    index.to_parquet(folder / "index.parquet", index=False)
    summary = IndexSummary(files_found=slices, read=slices, labels_file=str(labels_csv), version=INDEX_VERSION,
                           labels_stamp=file_stamp(labels_csv), images_stamp=file_stamp(images))
    write_atomic(folder / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary.__dict__)))
    return as_bytes(index["path"])


class ConstantLoader(DicomLoader):
    """Reads each slice's path as the DICOM loader does, then gives a constant plane instead of the file."""

    def __call__(self, row: int) -> list[np.ndarray]:
        self.paths[row].decode()
        return [np.zeros((self.size, self.size), np.uint8)] * len(self.windows)


def private_mb() -> float:
    """Memory of this process that no other process shares (copy-on-write copies included), in MB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:])
    return sum(int(fields[name].split()[0]) for name in ("Private_Clean", "Private_Dirty")) / 1024


def collate_with_memory(items: list[dict]) -> dict:
    batch = collate_skipping(items)
    batch["worker_private_mb"] = private_mb()
    return batch


def scale(workdir: Path, slices: int, series: int) -> dict:
    """Setup time of the data module from a fresh index, host bytes per training slice, and the growth of
    one DataLoader worker's private memory over one pass over the training keys (windows x context 1)."""
    paths = synthetic_rsna(workdir / "rsna", workdir / "cache", slices, series)
    datamodule = ICHDataModule(source="rsna", root=str(workdir / "rsna"), cache_dir=str(workdir / "cache"),
                               context=1, image_size=256, num_workers=1, output_dir=str(workdir / "run"))
    start = time.perf_counter()
    datamodule.prepare_data()
    datamodule.setup()
    setup_s = time.perf_counter() - start
    train = datamodule.datasets["train"]
    arrays = (train.stacks, train.targets, train.image_ids, paths)
    train.loader = ConstantLoader(paths, datamodule.windows, 8)
    train.transform = None  # pixels are not the point here: what a worker touches per slice is
    loader = DataLoader(train, batch_size=512, sampler=EpochShuffle(train, 0), num_workers=1,
                        collate_fn=collate_with_memory, worker_init_fn=init_worker)
    memory = [batch["worker_private_mb"] for batch in tqdm(loader, desc="One pass over the training keys",
                                                           unit="batch", mininterval=2.0)]
    result = {
        "slices": slices, "series": series, "train_slices": len(train),
        "setup_s": round(setup_s, 2),
        "bytes_per_slice": round(sum(a.nbytes for a in arrays) / len(train), 1),
        "worker_rss_growth_mb": round(memory[-1] - memory[0], 1),
    }
    result["targets"] = {name: {"value": result[name], "at_most": limit, "met": result[name] <= limit}
                         for name, limit in SCALE_TARGETS.items()}
    return result


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def projection(result: dict, cores: int, on_gpu: bool) -> dict:
    """Hours for one RSNA epoch from the measured rates: a projection, not a measurement.

    Loader work is assumed to scale linearly over the cores (workers on a GPU machine). On a CPU-only
    machine the loader and the model share the cores, so their times add; on a GPU they overlap.
    """
    rates = result["per_core"]
    train = result["model"]["train_images_per_s"]
    workers = resolve_workers("auto") if on_gpu else cores

    def epoch_hours(loader_rate_per_core: float) -> float:
        loader_s, model_s = RSNA_SLICES / (loader_rate_per_core * workers), RSNA_SLICES / train
        return round((max(loader_s, model_s) if on_gpu else loader_s + model_s) / 3600, 2)

    out = {
        "slices": RSNA_SLICES,
        "loader_cores": workers,
        "epoch_hours_dicom_path": epoch_hours(rates["loader_dicom_augmented"]),
        "epoch_hours_cache_path": epoch_hours(rates["loader_cache_augmented"]),
        "epoch_hours_model_alone": round(RSNA_SLICES / train / 3600, 2),
    }
    if result["cache_build"]:
        out["cache_build_hours"] = round(RSNA_SLICES / result["cache_build"]["images_per_s"] / 3600, 2)
    return out


def target_checks(result: dict) -> dict:
    rates = result["per_core"]
    ratios = {
        "dicom_vs_naive": rates["dicom_ich"] / rates["dicom_naive"],
        "cache_vs_dicom": rates["loader_cache"] / rates["loader_dicom"],
    }
    compared = result["model"].get("loader_vs_random")
    if compared:
        ratios["real_vs_random"] = compared["ratio"]
    for source, figures in result.get("train", {}).get("ich_vs_plain", {}).items():
        ratios[f"ich_vs_plain_{source}"] = figures["ratio"]
    return {
        name: {"ratio": round(value, 2), "target": TARGETS[name], "met": value >= TARGETS[name]}
        for name, value in ratios.items()
    }


def print_table(result: dict) -> None:
    cores, model = result["machine"]["cores"], result["model"]
    print(f"\n{result['machine']['cpu']} ({cores} cores), GPU: {result['machine']['gpu'] or 'none'}")
    print(f"{'images/s on one core (median of ' + str(result['settings']['repeats']) + ')':<52}{'images/s':>10}")
    for name, rate in result["per_core"].items():
        print(f"  {name:<50}{rate:>10.1f}")
    print(f"  {'site augmentation, ms per image (data.augment.site)':<50}{result['site_augmentation_ms']:>10.2f}")
    if result["cache_build"]:
        print(f"  {'cache build, all ' + str(cores) + ' cores':<50}{result['cache_build']['images_per_s']:>10.1f}")
    print(f"{model['backbone']} {model['size']}px {model['precision']} batch {model['batch_size']} on {model['device']}:")
    print(f"  train {model['train_images_per_s']:.1f} images/s ({model['train_tflops_per_s']:.3f} TFLOP/s), "
          f"inference {model['infer_images_per_s']:.1f} images/s ({model['infer_tflops_per_s']:.3f} TFLOP/s), "
          f"{model['forward_gflops_per_image']:.2f} GFLOP per image forward")
    if "loader_vs_random" in model:
        compared = model["loader_vs_random"]
        print(f"  real batches ({compared['workers']} workers) {compared['real_images_per_s']:.1f} images/s vs "
              f"random tensors on the device {compared['random_images_per_s']:.1f}: {compared['ratio']:.2f}")
    for source, figures in result["train"].get("ich_vs_plain", {}).items():
        print(f"train/ich_vs_plain from {source}: {figures['backbone']} {figures['size']}px {figures['precision']} "
              f"batch {figures['batch_size']}, {figures['workers']} workers, {figures['threads']} threads: ich "
              f"{figures['ich_images_per_s']:.1f} vs plain {figures['plain_images_per_s']:.1f} images/s = {figures['ratio']:.2f}")
    for name, check in result["targets"].items():
        print(f"target {name}: {check['ratio']}x (want >= {check['target']}): {'met' if check['met'] else 'NOT met'}")
    print(f"projection, one RSNA epoch ({RSNA_SLICES:,} slices): {result['projection']}")
    if "scale" in result:
        figures = result["scale"]
        print(f"scale: {figures['slices']:,} slices in {figures['series']:,} series: setup {figures['setup_s']} s, "
              f"{figures['bytes_per_slice']} bytes per training slice, worker private memory "
              f"+{figures['worker_rss_growth_mb']} MB over one pass")
        for name, check in figures["targets"].items():
            print(f"target scale/{name}: {check['value']} (want <= {check['at_most']}): "
                  f"{'met' if check['met'] else 'NOT met'}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ich.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=200, help="phantom slices to write and read")
    parser.add_argument("--dicom-size", type=int, default=512, help="pixels per side of the phantom DICOMs")
    parser.add_argument("--size", type=int, default=256, help="training image size")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of each per-core measurement")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="least time of one per-core measurement")
    parser.add_argument("--backbone", default="resnet18", help="timm model name")
    parser.add_argument("--precision", choices=("32", "bf16-mixed"), default=None,
                        help="default: bf16-mixed on a GPU, 32 on the CPU")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=None, help="timed model steps (default: 50 on a GPU, 4 on the CPU)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed model steps before timing")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the model figures (default: every usable core)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, to report the fraction reached")
    parser.add_argument("--compare-loader", action=argparse.BooleanOptionalAction, default=None,
                        help="train on cached batches and on random tensors on the device (default: on a GPU)")
    parser.add_argument("--loader-workers", default="auto", help="DataLoader processes of --compare-loader")
    parser.add_argument("--vs-plain", action=argparse.BooleanOptionalAction, default=True,
                        help="train through ich and through a plain loop, from an image folder and the slice cache")
    parser.add_argument("--vs-plain-steps", type=int, default=30, help="timed training steps of --vs-plain")
    parser.add_argument("--vs-plain-size", type=int, default=192, help="image size of --vs-plain")
    parser.add_argument("--vs-plain-patients", type=int, default=60, help="phantom patients (12 slices each) of --vs-plain")
    parser.add_argument("--scale", action="store_true",
                        help="also measure data-module setup and loader memory on a synthetic RSNA-sized index")
    parser.add_argument("--scale-slices", type=int, default=RSNA_SLICES, help="slices of the --scale index")
    parser.add_argument("--scale-series", type=int, default=RSNA_SERIES, help="series of the --scale index")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the phantom and cache here (default: a temporary folder)")
    parser.add_argument("--malloc-defaults", action="store_true",
                        help="leave glibc's allocator as it is (figures then depend on its state; see the module doc)")
    parser.add_argument("--out", type=Path, default=Path("bench.json"), help="where to write the JSON results")
    args = parser.parse_args(argv)
    if args.loader_workers != "auto":
        args.loader_workers = int(args.loader_workers)
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if not args.malloc_defaults:
        reuse_freed_memory()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    args.precision = args.precision or ("bf16-mixed" if on_gpu else "32")
    args.steps = args.steps or (50 if on_gpu else 4)
    compare = on_gpu if args.compare_loader is None else args.compare_loader
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        index = phantom_index(workdir, args.slices, args.dicom_size)
        fresh = not any(workdir.glob("slices-*"))  # a cache kept in --workdir from an earlier run has no build rate
        start = time.perf_counter()
        cache = load_or_build_cache(index, workdir, args.size)
        built = time.perf_counter() - start
        cache_build = {"images_per_s": round(len(index) / built, 1), "cores": cores} if fresh else None
        rates = per_core(index, cache, args)
        torch.set_num_threads(args.threads or cores)
        loader = training_loader(cache, index, args, device) if compare else None
        model = model_speed(args, device, loader)
        train = {"ich_vs_plain": vs_plain(workdir / "vs-plain", args)} if args.vs_plain else {}
    result = {
        "machine": {
            "cpu": cpu_model(), "cores": cores, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "pydicom": pydicom.__version__, "opencv": cv2.__version__,
        },
        "settings": {
            "slices": len(index), "dicom_size": args.dicom_size, "size": args.size, "windows": list(WINDOW_NAMES),
            "repeats": args.repeats, "batch_size": args.batch_size, "reuse_freed_memory": not args.malloc_defaults,
            "input": "phantom DICOMs, 16-bit uncompressed, from the page cache",
            "augment": "the data.augment defaults of conf/data/_common.yaml",
        },
        "per_core": {name: round(statistics.median(values), 1) for name, values in rates.items()},
        "per_core_repeats": {name: [round(v, 1) for v in values] for name, values in rates.items()},
        "site_augmentation_ms": site_cost_ms(rates),
        "cache_build": cache_build,
        "model": model,
        "train": train,
    }
    if args.scale:
        with tempfile.TemporaryDirectory() as tmp:
            result["scale"] = scale(Path(tmp), args.scale_slices, args.scale_series)
    result["targets"] = target_checks(result)
    result["projection"] = projection(result, cores, on_gpu)
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {args.out}")
    return result


if __name__ == "__main__":
    main()
