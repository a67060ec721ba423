"""Evaluate one trained checkpoint: `run(cfg)` is what `python evaluate.py ckpt_path=PATH` calls.

The checkpoint says how its inputs were made (windows, context, image size, normalisation), which
data it was trained on, and its operating thresholds and temperature, so the .ckpt file alone is
enough: by default it is tested on its training data's test patients (the run's split.csv when the run
folder is still beside it, else the same split drawn again from the saved seed). Other data can be
chosen (`data=rsna data.root=DIR`): the input is still shaped as in training, and a dataset other than
training's is used whole as an external test set. Data options that contradict the checkpoint are
refused. Everything goes to the evaluation's own folder; a training run is only read.
"""

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ich.data.datamodule import ICHDataModule
from ich.data.windows import parse_windows
from ich.html_report import write_evaluation_report
from ich.metrics import build_metrics
from ich.module import ICHLitModule, predict_logits
from ich.operating import honest_metrics, slice_groups
from ich.plots import save_figures, save_reliability_diagram
from ich.results import predictions_table, print_metrics, write_json
from ich.runs import best_checkpoint, training_run_dir
from ich.tasks import LABELS, Task

log = logging.getLogger(__name__)

# Data keys that shape the input tensor: a checkpoint only makes sense on inputs shaped as in training.
INPUT_KEYS = ("windows", "context", "image_size")
# Data keys that say which slices these are: when one differs from training's, it is another dataset.
IDENTITY = ("source", "root", "image_dir", "labels", "phantom")
# Kaggle scores log loss: a probability of exactly 0 or 1 on a wrong answer would cost infinity.
SUBMISSION_CLIP = 1e-6


def run(cfg: DictConfig, overrides: Sequence[str] | None = None) -> dict[str, float]:
    """Test the checkpoint `cfg.ckpt_path`; returns the flat metrics also written to metrics.json.

    `overrides` are the command-line overrides (`data.image_size=128`, ...); by default Hydra's own,
    and none when the config was composed outside a Hydra app (tests, notebooks).
    """
    if overrides is None:
        overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else ()
    checkpoint = checkpoint_path(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    model = ICHLitModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
    task = model.task
    test_dir = submission_folder(cfg, task)
    run_dir = training_run_dir(checkpoint)
    inputs, trained = saved_inputs(model, checkpoint)
    data = data_config(cfg, trained, command_line_keys(overrides), run_dir)
    check_inputs(inputs, data)
    label = task.outputs[0] if task.name == "binary" else None
    datamodule = ICHDataModule(task=task.name, label=label, output_dir=str(output_dir), **data)
    datamodule.prepare_data()
    datamodule.setup()
    if not len(datamodule.datasets["test"]):
        raise ValueError(f"The test split holds no slices for task={task.name}: evaluate on more data (data.root=DIR).")
    if data["split_file"] is None:
        warn_if_seen_in_training(datamodule.tables["test"]["image_id"], run_dir / "split.csv")

    trainer = pl.Trainer(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        precision=cfg.precision,
        logger=False,
        enable_checkpointing=False,
        default_root_dir=str(output_dir),
    )
    ids, logits, targets = predict_logits(trainer, model, datamodule.predict_dataloader())
    probs = model.probabilities(logits)  # at the checkpoint's temperature

    metrics = compute_metrics(task, float(model.hparams.threshold), probs, targets)
    patients, studies = slice_groups(datamodule.tables["test"], ids)
    temperature = float(model.temperature)
    metrics.update(honest_metrics(task, logits, targets, model.op_thresholds.cpu().numpy(), temperature, patients, studies,
                                  resamples=int(cfg.bootstrap), seed=int(cfg.seed)))
    metrics["data/slices_test"] = float(len(ids))
    write_json(output_dir / "metrics.json", dict(sorted(metrics.items())))
    table = predictions_table(task, ids, datamodule.tables["test"].set_index("image_id")["patient"], probs, targets)
    table.to_csv(output_dir / "predictions.csv", index=False)
    save_figures(output_dir, task, float(model.hparams.threshold), probs, targets)
    save_reliability_diagram(output_dir / "reliability.png", task, logits, targets, temperature)
    write_evaluation_report(output_dir / "report.html", title=f"{task.name} / {model.hparams.backbone}: evaluation",
                            checkpoint=checkpoint, data=f"{data['source']} {data.get('root') or ''}".strip(),
                            model=model, datamodule=datamodule, metrics=metrics, predictions=table)

    if test_dir is not None:
        write_submission(output_dir / "submission.csv", trainer, model, datamodule, test_dir)
    print_metrics(metrics, title=f"{task.name} / {model.hparams.backbone} on {len(ids)} test slices -> {output_dir}")
    return metrics


# --- which checkpoint, which data ---------------------------------------------------------------------


def checkpoint_path(cfg: DictConfig) -> Path:
    example = "e.g. ckpt_path=outputs/<date>/<time> (its best checkpoint) or a .ckpt in its checkpoints/"
    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.ckpt_path:
        raise ValueError(f"Evaluation needs a checkpoint: pass ckpt_path=PATH to a run folder or .ckpt of train.py, {example}.")
    path = Path(cfg.ckpt_path).expanduser()
    if path.is_dir():
        return best_checkpoint(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"ckpt_path={cfg.ckpt_path} does not exist: pass a .ckpt written by train.py, {example}."
        )
    return path


def submission_folder(cfg: DictConfig, task: Task) -> Path | None:
    """Check `test_dir` before any work is done: only a six-label checkpoint can fill a Kaggle submission."""
    if not cfg.get("test_dir"):
        return None
    if task.outputs != LABELS:
        raise ValueError(
            f"test_dir writes an RSNA submission, which needs all six labels: train with task=multilabel "
            f"(this checkpoint is task={task.name})."
        )
    test_dir = Path(cfg.test_dir).expanduser()
    if not test_dir.is_dir():
        raise FileNotFoundError(
            f"test_dir={cfg.test_dir} does not exist: point it at a folder of DICOMs (Kaggle stage_2_test/)."
        )
    return test_dir


def saved_inputs(model: ICHLitModule, checkpoint: Path) -> tuple[dict, dict]:
    """What the checkpoint says of its inputs and of its training data (ICHLitModule's `inputs` and `data`)."""
    inputs, data = model.hparams.get("inputs"), model.hparams.get("data")
    if not inputs or not data:
        raise ValueError(f"{checkpoint} does not say how its inputs were made (it predates self-describing "
                         "checkpoints): train it again with this version of ich.")
    return inputs, data


def command_line_keys(overrides: Sequence[str]) -> set[str]:
    """The config keys set on the command line: `+data.context=1` -> `data.context`."""
    return {override.lstrip("+~").split("=", 1)[0] for override in overrides}


def data_config(cfg: DictConfig, trained: dict, given: set[str], run_dir: Path) -> dict:
    """ICHDataModule arguments: training's data and test patients, or the chosen data shaped like training's."""
    chosen = OmegaConf.to_container(cfg.data, resolve=True) if cfg.get("data") else {}
    if "source" in chosen:  # a data group was chosen on the command line
        data = chosen
        data.update({key: trained[key] for key in INPUT_KEYS if f"data.{key}" not in given})
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
        log.info("Testing on the training run's test patients from %s", data["split_file"])
    else:
        log.info("No split.csv in %s: the training config's split and seed give the same test patients again", run_dir)
    for key in ("batch_size", "num_workers"):
        if cfg.get(key) is not None:
            data[key] = cfg[key]
    return data


def check_inputs(inputs: dict, data: dict) -> None:
    """Refuse data options that would shape the input otherwise than training did, naming the key."""
    if (inputs["source"] == "images") != (data["source"] == "images"):
        trained_on = "PNG/JPG slices (data=images)" if inputs["source"] == "images" else "DICOM slices"
        raise ValueError(f"The checkpoint was trained on {trained_on}: evaluate it on the same kind of data.")
    given = {"context": int(data["context"]), "image_size": int(data["image_size"])}
    if inputs["windows"] is not None:
        given["windows"] = [[w.center, w.width] for w in parse_windows(data["windows"])]
    for key, value in given.items():
        if value != inputs[key]:
            raise ValueError(f"data.{key}={value} differs from the checkpoint's {inputs[key]}: the model only knows "
                             f"inputs made as in training, so leave data.{key} out or set it to {inputs[key]}.")


def warn_if_seen_in_training(image_ids: pd.Series, split_csv: Path) -> None:
    """External data that shares slices with training's train/val patients flatters the model: say so."""
    if not split_csv.is_file():
        return
    split = pd.read_csv(split_csv, dtype=str)
    seen = image_ids.isin(split.loc[split["split"] != "test", "image_id"])
    if seen.any():
        log.warning(
            "%d of the %d test slices were train/val slices of the training run, so these metrics are optimistic; "
            "if this is the training data at another path, pass data.split_file=%s to test its test patients only.",
            int(seen.sum()), len(image_ids), split_csv,
        )


# --- predictions and what is made of them ---------------------------------------------------------


def compute_metrics(task: Task, threshold: float, probs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """The training test stage's collection on all predictions at once, so the names match (`test/auroc`, ...)."""
    collection = build_metrics(task, threshold, prefix="test/")
    collection.update(probs, targets.long())
    metrics = {name: float(value) for name, value in sorted(collection.compute().items())}
    undefined = [name for name, value in metrics.items() if math.isnan(value)]
    if undefined:
        log.warning("Undefined on these slices (a class absent), written as null: %s", ", ".join(undefined))
    return metrics


def write_submission(
    path: Path, trainer: pl.Trainer, model: ICHLitModule, datamodule: ICHDataModule, test_dir: Path
) -> None:
    """Kaggle's `ID,Label` rows, six per image (`ID_<hex>_<label>`), for the unlabelled DICOMs of `test_dir`."""
    ids, logits, _ = predict_logits(trainer, model, datamodule.folder_dataloader(test_dir))
    rows = submission_rows(ids, model.probabilities(logits))
    rows.to_csv(path, index=False, float_format="%.6g")
    missing = sorted({file.stem for file in test_dir.rglob("*.dcm")} - set(ids))
    if missing:
        log.warning(
            "%d DICOMs of %s could not be read and have no rows in %s (Kaggle rejects a submission without them): %s",
            len(missing), test_dir, path.name, ", ".join(missing[:10]),
        )
    log.info("Wrote %d rows for %d images to %s", len(rows), len(ids), path)


def submission_rows(ids: list[str], probs: torch.Tensor) -> pd.DataFrame:
    """Six `ID,Label` rows per image in LABELS order, probabilities clipped away from 0 and 1."""
    clipped = probs.double().clamp(SUBMISSION_CLIP, 1 - SUBMISSION_CLIP).numpy()
    names = [f"{image_id}_{label}" for image_id in ids for label in LABELS]
    return pd.DataFrame({"ID": names, "Label": clipped.reshape(-1)})
