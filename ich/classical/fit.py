"""What `python fit_classical.py` does: a classifier on cached features, reported as evaluate.py reports a checkpoint.

The run folder gets the same metrics.json (same metric names as end-to-end training: `test/acc`,
`test/auroc`, ...), predictions.csv, confusion_matrix.png and roc.png, so classical and deep runs
compare row by row; plus the classifier itself (classifier.skops and classifier.json).
"""

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import sklearn
import torch
from omegaconf import DictConfig, OmegaConf

from ich.classical.classifiers import Fitted, fit_search, probabilities
from ich.classical.features import Split, load_or_extract
from ich.classical.saving import save_classifier
from ich.core.results import predictions_table, print_metrics, write_json
from ich.core.tasks import Task, get_task
from ich.evaluation.metrics import metrics_at_once
from ich.evaluation.plots import save_figures

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, float]:
    """Fit, choose and test one classifier; returns the flat metrics also written to metrics.json."""
    task = get_task(cfg.task.name, cfg.task.get("label"))
    threshold = float(cfg.task.threshold)
    output_dir = Path(cfg.output_dir)
    splits, folder = load_or_extract(cfg)
    check_splits(splits, task)

    started = time.perf_counter()
    fitted = fit_search(cfg.classifier, task, splits["train"], splits["val"], int(cfg.seed), threshold)
    scoring = cfg.classifier.search.scoring
    metrics = {
        "time/fit_seconds": time.perf_counter() - started,
        f"search/cv_{scoring}": fitted.cv_score,
        f"search/val_{scoring}": fitted.val_score,
    }
    if len(splits["val"]):
        metrics.update(split_metrics(fitted, task, threshold, splits["val"], "val/"))
    metrics.update(split_metrics(fitted, task, threshold, splits["test"], "test/"))
    metrics.update({f"data/slices_{stage}": float(len(split)) for stage, split in splits.items()})
    undefined = sorted(name for name, value in metrics.items() if math.isnan(value))
    if undefined:
        log.warning("Undefined on this data (a class absent from the split), written as null: %s", ", ".join(undefined))
    write_json(output_dir / "metrics.json", metrics)
    write_predictions(output_dir, fitted, task, threshold, splits["test"])
    if cfg.get("save", True):
        save_classifier(output_dir / "classifier.skops", fitted.estimator, describe(cfg, task, fitted, folder))
    print_metrics(metrics, title=f"{task.name} / {cfg.classifier.name} on {folder.name} -> {output_dir}")
    return metrics


def check_splits(splits: dict[str, Split], task: Task) -> None:
    if not len(splits["test"]):
        raise ValueError(f"The test split holds no slices for task={task.name}: use more data or a larger data.split.")
    if len(np.unique(splits["train"].targets, axis=0)) < 2:
        raise ValueError(f"The training split holds a single class for task={task.name}: use more data.")


def split_metrics(fitted: Fitted, task: Task, threshold: float, split: Split, prefix: str) -> dict[str, float]:
    """End-to-end training's metric collection on the classifier's predictions, named `<prefix><metric>` as there."""
    probs = probabilities(fitted.estimator, split.features, task)
    return metrics_at_once(task, threshold, torch.from_numpy(probs), torch.from_numpy(split.targets), prefix)


def write_predictions(output_dir: Path, fitted: Fitted, task: Task, threshold: float, test: Split) -> None:
    """predictions.csv, confusion_matrix.png and roc.png of the test split, drawn as evaluate.py draws them."""
    probs = torch.from_numpy(probabilities(fitted.estimator, test.features, task)).float()
    targets = torch.from_numpy(test.targets)
    patients = pd.Series(test.patients, index=test.image_ids)
    table = predictions_table(task, list(test.image_ids), patients, probs, targets)
    table.to_csv(output_dir / "predictions.csv", index=False)
    save_figures(output_dir, task, threshold, probs, targets)


def describe(cfg: DictConfig, task: Task, fitted: Fitted, folder: Path) -> dict:
    """classifier.json: the classifier, how it was chosen, and the features it expects (extractor and preprocessing)."""
    return {
        "classifier": cfg.classifier.name,
        "estimator": OmegaConf.to_container(cfg.classifier.estimator, resolve=True),
        "scale": bool(cfg.classifier.scale),
        "params": fitted.params,
        "search": {**OmegaConf.to_container(cfg.classifier.search, resolve=True), "candidates": fitted.candidates},
        "task": task.name,
        "outputs": list(task.outputs),
        "threshold": float(cfg.task.threshold),
        "features": json.loads((folder / "features.json").read_text()),
        "features_cache": str(folder),
        "sklearn_version": sklearn.__version__,
    }
