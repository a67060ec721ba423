"""Frozen-backbone features of every slice of the train/val/test splits, computed once and cached.

The classical classifiers refit in seconds, but a backbone pass over the data takes minutes to hours,
so features are kept on disk under a key of everything that changes them: the extractor (backbone,
its weights, our checkpoint) and the data's identity, preprocessing and split. A run whose key matches
an earlier run's reads that run's features instead of running the backbone again.
"""

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from rich.progress import track

from ich.core.results import file_digest, print_metrics, write_json
from ich.core.runs import IDENTITY, INPUT_KEYS, describe_data
from ich.core.tasks import get_task
from ich.data.datamodule import ICHDataModule
from ich.data.splits import STAGES
from ich.data.windows import to_unit_float

log = logging.getLogger(__name__)

# Bump when the files or their meaning change, so old caches are not read as new ones.
FORMAT_VERSION = 2  # 2: inputs normalised as in training (ICHLitModule.features); the outputs in the key
# Data keys that change which slices there are, how they look, or which split each falls in.
DATA_KEYS = (*IDENTITY, *INPUT_KEYS, "modalities", "min_brain_fraction", "split", "split_file", "seed", "balance",
             "balance_ratio")
FEATURE_KINDS = ("backbone", "pixels")


@dataclass(frozen=True)
class Split:
    """The features of one split, row-aligned with the targets (as the data module gives them) and the ids."""

    features: np.ndarray  # [N, D] float32
    targets: np.ndarray  # [N, K] float32 for sigmoid tasks, [N] int64 class indices for subtype
    image_ids: np.ndarray  # [N] str
    patients: np.ndarray  # [N] str, the pseudonymised patient of each slice (the CV groups)

    def __len__(self) -> int:
        return len(self.features)

    def subset(self, rows: np.ndarray) -> "Split":
        return Split(self.features[rows], self.targets[rows], self.image_ids[rows], self.patients[rows])


def feature_key(cfg: DictConfig) -> dict:
    """Everything that changes the cached arrays; files are named by their content, not their path."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    described = describe_data(data, DATA_KEYS)
    described["split_file"] = file_digest(data.get("split_file"))
    kind = cfg.get("features", "backbone")
    if kind not in FEATURE_KINDS:
        raise ValueError(f"Unknown features={kind}: choose features=backbone or features=pixels.")
    extractor = {"features": kind}
    if kind == "backbone":
        extractor.update(
            backbone=cfg.model.backbone,
            normalize=cfg.model.normalize,
            pretrained=bool(cfg.model.pretrained) and not cfg.model.weights,
            weights=file_digest(cfg.model.weights),
            init_from=file_digest(cfg.model.init_from),
        )
        if not (extractor["pretrained"] or extractor["weights"] or extractor["init_from"]):
            extractor["init_seed"] = int(cfg.seed)  # random weights: the seed decides them
    task = get_task(cfg.task.name, cfg.task.get("label"))  # the label too: its targets are another column
    return {"version": FORMAT_VERSION, "task": task.name, "outputs": list(task.outputs), "extractor": extractor,
            "data": described}



def cache_folder(cfg: DictConfig, key: dict) -> Path:
    """<features_dir>/<extractor>-<task>-<hash>: readable at a glance, unique per key."""
    name = key["extractor"].get("backbone", key["extractor"]["features"])
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cfg.features_dir).expanduser() / f"{name}-{key['task']}-{digest}"


def run(cfg: DictConfig) -> Path:
    """What `python extract.py` does: find or make the features, and note in the run folder where they are."""
    splits, folder = load_or_extract(cfg)
    shapes = {stage: list(split.features.shape) for stage, split in splits.items()}
    write_json(Path(cfg.output_dir) / "features.json", {"cache": str(folder), "shapes": shapes})
    counts = {f"{stage}/slices": float(len(split)) for stage, split in splits.items()}
    print_metrics({**counts, "features": float(splits["train"].features.shape[1])}, title=f"features: {folder.name}")
    return folder


def load_or_extract(cfg: DictConfig) -> tuple[dict[str, Split], Path]:
    """The features of every split and the cache folder they were read from (extracted there first if new)."""
    key = feature_key(cfg)
    folder = cache_folder(cfg, key)
    if (folder / "features.json").is_file():
        log.info("Reusing the cached features in %s", folder)
    else:
        extract_to(cfg, key, folder)
    splits = {stage: read_split(folder, stage) for stage in STAGES}
    write_split_csv(Path(cfg.output_dir), splits)
    return splits, folder


def extract_to(cfg: DictConfig, key: dict, folder: Path) -> None:
    """Run the extractor over every split and write the arrays; a half-written folder never looks finished."""
    pl.seed_everything(cfg.seed, workers=True)  # random-init backbones draw their weights now
    datamodule = ICHDataModule.from_config(cfg)
    datamodule.prepare_data()
    datamodule.setup()
    device = pick_device(cfg.get("device", "auto"))
    extract = build_extractor(cfg, datamodule.task.name, datamodule.num_channels, device)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for stage in STAGES:
        patients = datamodule.tables[stage].set_index("image_id")["patient"]
        features, targets, ids = extract_split(extract, datamodule, stage, device)
        np.save(tmp / f"{stage}_features.npy", features)
        np.save(tmp / f"{stage}_targets.npy", targets)
        table = pd.DataFrame({"image_id": ids, "patient": patients.loc[ids].to_numpy()})
        table.to_csv(tmp / f"{stage}_ids.csv", index=False)
    shapes = {stage: list(np.load(tmp / f"{stage}_features.npy", mmap_mode="r").shape) for stage in STAGES}
    description = {**key, "in_chans": datamodule.num_channels, "shapes": shapes, "summary": datamodule.summary}
    (tmp / "features.json").write_text(json.dumps(description, indent=2, sort_keys=True))
    try:
        os.rename(tmp, folder)
    except OSError:
        shutil.rmtree(tmp)  # another run finished the same key first; its arrays are identical
    log.info("Features cached in %s (%s)", folder, ", ".join(f"{s} {shapes[s]}" for s in STAGES))


def build_extractor(
    cfg: DictConfig, task: str, in_chans: int, device: torch.device
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Batch images as the loader gives them -> features [B, D]: the slice's pixels, or the pooled features of the
    backbone a training run with this `model` config would start from (pretrained, weights or init_from),
    normalised as training normalises them (ICHLitModule.features)."""
    if cfg.get("features", "backbone") == "pixels":
        return pixels
    from ich.training.module import ICHLitModule

    model = OmegaConf.to_container(cfg.model, resolve=True)
    model["compile"] = False
    return ICHLitModule(task=task, in_chans=in_chans, **model).to(device).eval().features


def pixels(image: torch.Tensor) -> torch.Tensor:
    """The slice itself as features: channels averaged to grayscale, then flattened (the per-label paper's input)."""
    return to_unit_float(image).mean(dim=1).flatten(1)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.inference_mode()
def extract_split(
    extract: Callable[[torch.Tensor], torch.Tensor], datamodule: ICHDataModule, stage: str, device: torch.device
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Features, targets and ids of the slices of `stage` that could be read, without the training augmentation."""
    dataset = datamodule.datasets[stage]
    loader = datamodule.loader(dataset.subset(np.arange(len(dataset)), transform=None))
    features, targets, ids = [], [], []
    for batch in track(loader, description=f"{stage} features", total=len(loader)):
        features.append(extract(batch["image"].to(device)).float().cpu().numpy())
        targets.append(batch["target"].numpy())
        ids += list(batch["image_id"])
    if not features:
        return np.zeros((0, 0), np.float32), np.asarray(dataset.targets[:0]), []
    return np.concatenate(features), np.concatenate(targets), ids


def read_split(folder: Path, stage: str) -> Split:
    ids = pd.read_csv(folder / f"{stage}_ids.csv", dtype=str, keep_default_na=False)
    return Split(
        features=np.load(folder / f"{stage}_features.npy"),
        targets=np.load(folder / f"{stage}_targets.npy"),
        image_ids=ids["image_id"].to_numpy(),
        patients=ids["patient"].to_numpy(),
    )


def write_split_csv(output_dir: Path, splits: dict[str, Split]) -> None:
    """The run's split.csv, as train.py writes it, also when the features came from the cache."""
    output_dir.mkdir(parents=True, exist_ok=True)
    rows = [
        pd.DataFrame({"image_id": split.image_ids, "patient": split.patients, "split": stage})
        for stage, split in splits.items()
    ]
    pd.concat(rows).to_csv(output_dir / "split.csv", index=False)
