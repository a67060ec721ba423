"""Run folders: where a checkpoint's run lives, which checkpoint `ckpt_path=last` or a run folder means, and
which data a checkpoint was trained on (for evaluate.py and for a second stage over its slices)."""

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning import LightningModule

log = logging.getLogger(__name__)

LAST = "last"
# Data keys that shape the input tensor: a checkpoint only makes sense on inputs shaped as in training. Chosen
# data takes them from the checkpoint's `inputs`, whose windows are those its planes were made with (ich.data.encoding).
INPUT_KEYS = ("windows", "context", "image_size")
# Data keys that say which slices these are: when one differs from training's, it is another dataset.
IDENTITY = ("source", "root", "image_dir", "labels", "phantom", "masks", "mask_labels", "min_mask_pixels",
            "label_columns", "first_slice", "patient_pattern", "sources")
PATH_KEYS = ("root", "image_dir", "labels", "masks")
# Data keys of image folders (conf/data/images.yaml) that say what their pixels are (ich.data.encoding).
ENCODING_KEYS = ("encoding", "encoding_window", "hu_scale", "hu_offset", "hu_clip")


def describe_data(data: dict, keys: tuple[str, ...]) -> dict:
    """`keys` of a data config with its paths made absolute, and an image folder's encoding: the part of a cache key
    (ich.training.embeddings, ich.classical.features) that says which slices and how they look, unchanged by the
    folder a run starts in. The encoding keys count only where the config has them, so the caches of other sources
    keep their keys."""
    described = {key: data.get(key) for key in keys}
    described.update({key: data[key] for key in ENCODING_KEYS if key in data})
    for key in PATH_KEYS:
        if described.get(key):
            described[key] = str(Path(described[key]).expanduser().resolve())
    return described


def training_run_dir(checkpoint: Path) -> Path:
    """train.py keeps checkpoints in <run>/checkpoints/; a checkpoint copied elsewhere is its own run folder."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def resume_checkpoint(ckpt_path: str, outputs: Path = Path("outputs")) -> Path:
    """The checkpoint to resume from: `last` (the newest run's last.ckpt), a run folder, or a .ckpt file."""
    if ckpt_path == LAST:
        candidates = sorted(outputs.glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise FileNotFoundError(
                f"ckpt_path=last found no checkpoints/last.ckpt under {outputs}/: pass the checkpoint's path instead."
            )
        return candidates[-1]
    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path} is not a checkpoint: pass a .ckpt file, a run folder, or last.")
    return path


def best_checkpoint(run: Path) -> Path:
    """The checkpoint a training run tested: its one best checkpoint beside last.ckpt (save_top_k=1), or
    last.ckpt when validation never saved one."""
    folder = run / "checkpoints"
    best = sorted(path for path in folder.glob("*.ckpt") if path.name != "last.ckpt")
    if len(best) == 1:
        return best[0]
    if best:
        raise ValueError(f"{folder} holds {len(best)} checkpoints besides last.ckpt: pass the one to test as ckpt_path.")
    if (folder / "last.ckpt").is_file():
        return folder / "last.ckpt"
    raise FileNotFoundError(f"{run} holds no checkpoints/*.ckpt: pass a run folder of train.py or a .ckpt file.")


def checkpoint_file(value: str | Path, option: str, what: str) -> Path:
    """The .ckpt that `option`=value names: a run folder of train.py stands for the checkpoint it tested
    (best_checkpoint); anything else must be a file, or the error says to pass `what`."""
    path = Path(str(value)).expanduser()
    if path.is_dir():
        return best_checkpoint(path)
    if not path.is_file():
        raise FileNotFoundError(f"{option}={value} does not exist: pass {what}.")
    return path


def saved_inputs(model: LightningModule, checkpoint: Path) -> tuple[dict, dict]:
    """What the checkpoint says of its inputs and of its training data (ICHLitModule's `inputs` and `data`)."""
    inputs, data = model.hparams.get("inputs"), model.hparams.get("data")
    if not inputs or not data:
        raise ValueError(f"{checkpoint} does not say how its inputs were made (it predates self-describing "
                         "checkpoints): train it again with this version of ich.")
    return inputs, data


def data_config(cfg: DictConfig, trained: dict, given: set[str], run_dir: Path, inputs: dict) -> dict:
    """ICHDataModule arguments: training's data and test patients, or the chosen data shaped like training's inputs
    (a model of windowed images applies its images' window to the chosen HU data)."""
    chosen = OmegaConf.to_container(cfg.data, resolve=True) if cfg.get("data") else {}
    if "source" in chosen:  # a data group was chosen on the command line
        data = chosen
        shape = {key: inputs[key] for key in INPUT_KEYS if inputs[key] is not None}  # windows None: not windowed by us
        data.update({key: value for key, value in shape.items() if f"data.{key}" not in given})
    else:  # the training run's data, with any +data.* tweaks on top
        data = OmegaConf.to_container(OmegaConf.merge(trained, chosen))

    changed = [key for key in IDENTITY if data.get(key) != trained.get(key)]
    if "data.split_file" in given:
        log.info("Testing on the test split of %s", data["split_file"])
    elif changed:
        log.info(
            "External validation: data.%s differs from the training run's, so all %s slices are test slices.",
            "/".join(changed),
            data["source"],
        )
        data.update(split=[0.0, 0.0, 1.0], split_file=None)
    elif (run_dir / "split.csv").is_file():
        data["split_file"] = str(run_dir / "split.csv")
        log.info("The split (and so the test patients) of the training run: %s", data["split_file"])
    else:
        log.info("No split.csv in %s: the training config's split and seed give the same test patients again", run_dir)
    for key in ("batch_size", "num_workers"):
        if cfg.get(key) is not None:
            data[key] = cfg[key]
    return data
