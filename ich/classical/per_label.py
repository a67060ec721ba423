"""One independent binary model per label, as the per-label paper did (`task=per_label`).

For each of the six labels, its positive slices against every other slice (other subtypes and normal
slices alike), trained on a 50/50 balanced sample of the training split drawn for that label alone.
The model is a scikit-learn classifier on cached features (`fit_classical.py task=per_label
classifier=logreg`), or one of our networks trained end to end (`python -m ich.classical.per_label
model=simple_cnn data.image_size=128`, the paper's small CNN). The report is the paper's table:
accuracy, precision and recall per label and their averages, in per_label.md, per_label.csv and
metrics.json (`test/acc_<label>`, ..., and the averages as `test/acc`, ...).
"""

import copy
import logging
import math
import time
from pathlib import Path

import hydra
import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import WandbLogger
from rich.console import Console
from rich.table import Table

from ich import CONFIG_DIR
from ich.classical.classifiers import fit_search, probabilities
from ich.classical.features import Split, load_or_extract, plain_loader, without_augmentation
from ich.classical.fit import stage_metrics
from ich.classical.saving import save_classifier
from ich.cli import friendly_errors
from ich.data.dataset import SliceDataset
from ich.data.splits import undersample
from ich.results import write_json
from ich.tasks import LABELS, get_task

log = logging.getLogger(__name__)

BINARY = get_task("binary")
# The paper's columns first (its "score" is accuracy, its recall our sensitivity), then the rest.
COLUMNS = ("acc", "precision", "sensitivity", "specificity", "f1", "auroc")


def run(cfg: DictConfig) -> dict[str, float]:
    """Six binary models, one per label; returns the flat metrics also written to metrics.json."""
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if "classifier" in cfg:
        rows, predictions = fit_classifiers(cfg, output_dir)
    else:
        rows, predictions = train_networks(cfg, output_dir)
    table = report_table(rows)
    metrics = flat_metrics(table)
    metrics["time/fit_seconds"] = time.perf_counter() - started
    write_json(output_dir / "metrics.json", metrics)
    table.to_csv(output_dir / "per_label.csv", index_label="label")
    (output_dir / "per_label.md").write_text(markdown(table))
    pd.concat(predictions).to_csv(output_dir / "predictions.csv", index=False)
    print_table(table, title=f"per label / {model_name(cfg)} -> {output_dir}")
    return metrics


def model_name(cfg: DictConfig) -> str:
    if "classifier" in cfg:
        extractor = cfg.model.backbone if cfg.get("features", "backbone") == "backbone" else "pixels"
        return f"{cfg.classifier.name} on {extractor}"
    return cfg.model.backbone


def multilabel_config(cfg: DictConfig) -> DictConfig:
    """The same data with all six labels on every slice, unbalanced: each label draws its own balanced sample."""
    six = copy.deepcopy(cfg)
    OmegaConf.update(six, "task.name", "multilabel")
    OmegaConf.update(six, "data.balance", "none")
    return six


def balanced_rows(positive: np.ndarray, seed: int) -> np.ndarray:
    """Row numbers of a 50/50 sample: every positive and as many negatives drawn at random (or the reverse)."""
    rows = pd.DataFrame({"row": np.arange(len(positive))})
    return undersample(rows, positive, 1.0, seed)["row"].to_numpy()


def label_rows(positive: np.ndarray, balance: bool, seed: int) -> np.ndarray:
    """The rows a label's model sees from one split: balanced (when both classes are there), or all of them."""
    return balanced_rows(positive, seed) if balance and has_both_classes(positive) else np.arange(len(positive))


def has_both_classes(positive: np.ndarray) -> bool:
    return 0 < int(positive.sum()) < len(positive)


# --- scikit-learn classifiers on features --------------------------------------------------------------


def fit_classifiers(cfg: DictConfig, output_dir: Path) -> tuple[dict[str, dict], list[pd.DataFrame]]:
    splits, folder = load_or_extract(multilabel_config(cfg))
    threshold, seed = float(cfg.task.threshold), int(cfg.seed)
    balance_eval = bool(cfg.task.get("balance_eval", True))
    rows, predictions = {}, []
    for k, label in enumerate(LABELS):
        train, val, test = (one_label(splits[stage], k) for stage in ("train", "val", "test"))
        train = train.subset(balanced_rows(train.targets[:, 0], seed))
        val = val.subset(label_rows(val.targets[:, 0], balance_eval, seed))
        test = test.subset(label_rows(test.targets[:, 0], balance_eval, seed))
        if not (has_both_classes(train.targets[:, 0]) and has_both_classes(test.targets[:, 0])):
            log.warning("No %s row: the training or test split lacks %s positives or negatives.", label, label)
            rows[label] = {"train_slices": len(train), "test_slices": len(test)}
            continue
        fitted = fit_search(cfg.classifier, BINARY, train, val, seed, threshold)
        probs = probabilities(fitted.estimator, test.features, BINARY)[:, 0]
        rows[label] = label_row(probs, test.targets[:, 0], threshold, len(train))
        predictions.append(prediction_rows(label, test.image_ids, test.patients, test.targets[:, 0], probs))
        if cfg.get("save", True):
            info = {"label": label, "classifier": cfg.classifier.name, "params": fitted.params, "features": str(folder)}
            (output_dir / "classifiers").mkdir(exist_ok=True)
            save_classifier(output_dir / "classifiers" / f"{label}.skops", fitted.estimator, info)
    return rows, predictions


def one_label(split: Split, k: int) -> Split:
    """A multilabel split as the binary task of label k: targets [N, 1]."""
    return Split(split.features, split.targets[:, k : k + 1], split.image_ids, split.patients)


# --- networks trained end to end -----------------------------------------------------------------------


def train_networks(cfg: DictConfig, output_dir: Path) -> tuple[dict[str, dict], list[pd.DataFrame]]:
    """One network per label, each trained and tested as train.py does, in <output_dir>/<label>/."""
    from ich.train import build_datamodule

    pl.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(multilabel_config(cfg))
    datamodule.prepare_data()
    datamodule.setup()
    balance_eval = bool(cfg.task.get("balance_eval", True))
    seed = int(cfg.seed)
    rows, predictions = {}, []
    for k, label in enumerate(LABELS):
        train = label_dataset(datamodule.datasets["train"], k, balanced=True, seed=seed)
        val = label_dataset(without_augmentation(datamodule.datasets["val"]), k, balance_eval, seed)
        test = label_dataset(without_augmentation(datamodule.datasets["test"]), k, balance_eval, seed)
        if not (has_both_classes(train.targets[:, 0]) and has_both_classes(test.targets[:, 0]) and len(val)):
            log.warning("No %s row: the training or test split lacks %s positives or negatives.", label, label)
            rows[label] = {"train_slices": len(train), "test_slices": len(test)}
            continue
        loaders = {stage: plain_loader(datamodule, data, f"{label}_{stage}", shuffle=stage == "train")
                   for stage, data in (("train", train), ("val", val), ("test", test))}
        ids, probs, truth = train_one(cfg, output_dir / label, datamodule.num_channels, loaders)
        patients = datamodule.tables["test"].set_index("image_id")["patient"].loc[ids].to_numpy()
        rows[label] = label_row(probs, truth, float(cfg.task.threshold), len(train))
        predictions.append(prediction_rows(label, ids, patients, truth, probs))
    return rows, predictions


def train_one(cfg: DictConfig, output_dir: Path, in_chans: int, loaders: dict) -> tuple[np.ndarray, ...]:
    """Fit a binary ICHLitModule with the run's model, optimizer, trainer and callbacks; predict the test
    loader with its best checkpoint. Returns image ids, probabilities and targets."""
    from ich.module import ICHLitModule
    from ich.train import build_trainer

    label_cfg = copy.deepcopy(cfg)
    OmegaConf.update(label_cfg, "output_dir", str(output_dir))  # checkpoints and logs of this label apart
    module = ICHLitModule(
        task="binary",
        in_chans=in_chans,
        threshold=float(cfg.task.threshold),
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True) if cfg.get("scheduler") else None,
        channels_last=bool(cfg.trainer.get("channels_last", False)),
        **OmegaConf.to_container(cfg.model, resolve=True),
    )
    trainer = build_trainer(label_cfg)
    trainer.fit(module, train_dataloaders=loaders["train"], val_dataloaders=loaders["val"])
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    batches = trainer.predict(module, dataloaders=loaders["test"], ckpt_path=best or None)
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()  # one W&B run per label, not six labels in the first one
    ids = np.asarray([image_id for batch in batches for image_id in batch["image_id"]])
    probs = torch.cat([batch["probs"] for batch in batches])[:, 0].float().numpy()
    truth = torch.cat([batch["target"] for batch in batches])[:, 0].numpy()
    return ids, probs, truth


def label_dataset(dataset: SliceDataset, k: int, balanced: bool, seed: int) -> SliceDataset:
    """The slices of a six-label dataset as the binary task of label k, optionally a 50/50 sample."""
    positive = dataset.targets[:, k]
    rows = label_rows(positive, balanced, seed)
    return SliceDataset(
        [dataset.stacks[i] for i in rows],
        dataset.targets[rows, k : k + 1],
        [dataset.image_ids[i] for i in rows],
        dataset.loader,
        transform=dataset.transform,
    )


# --- the report ---------------------------------------------------------------------------------------


def label_row(probs: np.ndarray, truth: np.ndarray, threshold: float, train_slices: int) -> dict[str, float]:
    """One row of the table: the binary test metrics of end-to-end training, and the sample sizes."""
    metrics = stage_metrics(BINARY, threshold, probs[:, None], truth[:, None], prefix="")
    return {**metrics, "train_slices": train_slices, "test_slices": len(truth)}


def prediction_rows(
    label: str, ids: np.ndarray, patients: np.ndarray, truth: np.ndarray, probs: np.ndarray
) -> pd.DataFrame:
    """predictions.csv rows of one label's test slices: each label has its own (balanced) test sample."""
    return pd.DataFrame(
        {"label": label, "image_id": ids, "patient": patients, "target": truth.astype(np.int64), "prob": probs}
    )


def report_table(rows: dict[str, dict]) -> pd.DataFrame:
    """Six rows (NaN for a label without a model) and their average over the labels that have one."""
    table = pd.DataFrame.from_dict(rows, orient="index").reindex(index=list(LABELS))
    table = table.reindex(columns=[*COLUMNS, "train_slices", "test_slices"])
    table.loc["average"] = table[list(COLUMNS)].mean(skipna=True)
    return table


def flat_metrics(table: pd.DataFrame) -> dict[str, float]:
    """`test/<metric>_<label>` per label, named as the multilabel task names its per-class metrics, and
    `test/<metric>` for the average."""
    metrics: dict[str, float] = {}
    for label in LABELS:
        for column in COLUMNS:
            metrics[f"test/{column}_{label}"] = float(table.at[label, column])
        for column in ("train_slices", "test_slices"):
            metrics[f"data/{column}_{label}"] = float(table.at[label, column])
    for column in COLUMNS:
        metrics[f"test/{column}"] = float(table.at["average", column])
    return metrics


def markdown(table: pd.DataFrame) -> str:
    """The paper's table layout (Score = accuracy, Recall = sensitivity), plus the other metrics."""
    header = ["label", "accuracy", "precision", "recall", "specificity", "f1", "auroc", "train slices", "test slices"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, row in table.iterrows():
        cells = [_cell(row[c]) for c in COLUMNS] + [_count(row["train_slices"]), _count(row["test_slices"])]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def _count(value: float) -> str:
    return "" if math.isnan(value) else str(int(value))


def print_table(table: pd.DataFrame, title: str) -> None:
    shown = Table(title=title)
    for name in ("label", "accuracy", "precision", "recall", "auroc"):
        shown.add_column(name, justify="left" if name == "label" else "right")
    for label, row in table.iterrows():
        shown.add_row(str(label), *(_cell(row[c]) for c in ("acc", "precision", "sensitivity", "auroc")))
    Console().print(shown)


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
@friendly_errors
def main(cfg: DictConfig) -> None:
    """`python -m ich.classical.per_label model=simple_cnn data.image_size=128`: the per-label networks."""
    run(cfg)


if __name__ == "__main__":
    main()
