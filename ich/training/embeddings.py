"""Per-slice embeddings of a frozen stage-1 checkpoint, extracted once and cached on disk for stage 2.

A backbone pass over every slice costs minutes to hours; the sequence model over them trains in seconds.
So the pooled features and the stage-1 logits of every slice of the index are written once, under
`data.cache_dir/embeddings/`, in a folder keyed by the SHA-256 of the encoder checkpoint's bytes, the data
(its identity, input shape and the index's slice ids in order) and the flip setting: every later stage-2 run,
sweep or evaluation of the same encoder on the same data reads them, and a retrained encoder gets new ones.
"""

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ich.core.results import write_atomic
from ich.core.runs import IDENTITY, INPUT_KEYS, describe_data
from ich.data.datamodule import ICHDataModule
from ich.training.module import ICHLitModule

log = logging.getLogger(__name__)

# Bump when the files or their meaning change, so an old cache is never read as a new one.
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Embeddings:
    """Row i is row i of the data module's index (each series together, in slice order)."""

    features: np.ndarray  # [N, D] float16: the encoder's pooled features
    logits: np.ndarray  # [N, K] float32: the encoder's logits (before its temperature)
    readable: np.ndarray  # [N] bool: False for a slice that could not be read (zeros above; never labelled)
    folder: Path
    about: dict  # embeddings.json: the key, the shapes and how fast they were extracted


def cache_key(encoder_sha256: str, datamodule: ICHDataModule, data: dict, flip: bool) -> dict:
    """Everything the cached arrays depend on; `data` is the data config the data module was built from."""
    described = describe_data(data, (*IDENTITY, *INPUT_KEYS))  # which slices, shaped how for the encoder
    ids = "\n".join(datamodule.index["image_id"].astype(str))
    return {"version": FORMAT_VERSION, "encoder_sha256": encoder_sha256, "flip": bool(flip), "data": described,
            "slices": hashlib.sha256(ids.encode()).hexdigest()}


def cache_folder(datamodule: ICHDataModule, key: dict) -> Path:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return datamodule.cache_dir / "embeddings" / f"{key['encoder_sha256'][:12]}-{digest}"


def load_or_extract(load_encoder: Callable[[], ICHLitModule], encoder_sha256: str, datamodule: ICHDataModule,
                    data: dict, flip: bool) -> Embeddings:
    """The embeddings of every slice of `datamodule` (set up) by the encoder whose checkpoint has this hash:
    read from the cache, or extracted there first. `load_encoder` is only called to extract, so a cached set
    needs no encoder file (evaluation of a stage-2 checkpoint whose encoder was moved)."""
    key = cache_key(encoder_sha256, datamodule, data, flip)
    folder = cache_folder(datamodule, key)
    about_file = folder / "embeddings.json"
    if about_file.is_file() and json.loads(about_file.read_text()).get("key") == key:
        log.info("Reusing the cached embeddings in %s", folder)
    else:
        extract_to(folder, load_encoder(), datamodule, key, flip)
    about = json.loads(about_file.read_text())
    return Embeddings(features=np.load(folder / "features.npy", mmap_mode="r"),
                      logits=np.load(folder / "logits.npy"), readable=np.load(folder / "readable.npy"),
                      folder=folder, about=about)


@torch.inference_mode()
def embed(encoder: ICHLitModule, images: torch.Tensor, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [B, D] and logits [B, K] of images as the data modules give them (through the encoder's one
    `features` path, the head in float32); with `flip`, averaged with those of the left-right mirror image."""
    features = encoder.features(images).float()
    logits = encoder.head(features)
    if flip:
        mirrored = encoder.features(images.flip(-1)).float()
        features, logits = (features + mirrored) / 2, (logits + encoder.head(mirrored)) / 2
    return features, logits


def extract_to(folder: Path, encoder: ICHLitModule, datamodule: ICHDataModule, key: dict, flip: bool) -> None:
    """Run the frozen encoder (eval mode) over every slice of the index, in index order, and write the arrays.

    Each file is written through a temporary name and `embeddings.json`, last, marks the folder complete.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoder = encoder.to(device).eval()
    dataset = datamodule.every_slice()
    row_of = {image_id.decode(): row for row, image_id in enumerate(dataset.image_ids)}
    features = logits = None
    readable = np.zeros(len(dataset), bool)
    started = time.perf_counter()
    with tqdm(total=len(dataset), desc="Embedding slices", unit="slice", mininterval=1.0) as progress:
        for batch in datamodule.loader(dataset):
            batch_features, batch_logits = embed(encoder, batch["image"].to(device), flip)
            if features is None:
                features = np.zeros((len(dataset), batch_features.shape[1]), np.float16)
                logits = np.zeros((len(dataset), batch_logits.shape[1]), np.float32)
            rows = np.array([row_of[image_id] for image_id in batch["image_id"]])
            features[rows] = batch_features.cpu().numpy()
            logits[rows] = batch_logits.cpu().numpy()
            readable[rows] = True
            progress.update(len(rows))
    seconds = time.perf_counter() - started
    if features is None:
        raise ValueError(f"None of the {len(dataset)} slices could be read: check the data folder.")
    unread = int((~readable).sum())
    if unread:
        log.warning("%d slices could not be read: stage 2 sees them as blanks and never scores them", unread)
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in (("features", features), ("logits", logits), ("readable", readable)):
        write_atomic(folder / f"{name}.npy", lambda tmp, array=array: _save(tmp, array))
    about = {"key": key, "encoder": type(encoder).__name__, "backbone": encoder.hparams.backbone,
             "shape": list(features.shape), "device": device.type, "seconds": seconds,
             "slices_per_second": len(dataset) / seconds, "unreadable": unread}
    write_atomic(folder / "embeddings.json", lambda tmp: tmp.write_text(json.dumps(about, indent=2, sort_keys=True)))
    log.info("Embedded %d slices in %.1f s (%.1f slices/s on %s) into %s", len(dataset), seconds,
             len(dataset) / seconds, device.type, folder)


def _save(path: Path, array: np.ndarray) -> None:
    with path.open("wb") as file:  # through a handle: np.save would add `.npy` to the temporary name
        np.save(file, array)
