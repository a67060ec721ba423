"""Writing and showing results: flat metrics as JSON and as a table on the console, predictions as a table;
files written atomically and named by their content."""

import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.console import Console
from rich.table import Table

from ich.core.tasks import Task


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Let `write` fill a temporary file, then rename it over `path`: a killed process never leaves half a file.

    The temporary name carries the process id, since the ranks of one DDP job may write the same file at once.
    """
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def write_json(path: Path, payload: dict, first: Mapping[str, str] | None = None) -> None:
    """Metrics as JSON, atomically, sorted by name after the lines of `first`: what a reader must see before any
    number (evaluate.py: what the model was trained on). NaN (a metric undefined on this data, such as AUROC without
    positives) becomes null: valid JSON."""
    clean = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in sorted(payload.items())}
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps({**(first or {}), **clean}, indent=2)))


def print_metrics(metrics: dict[str, float], title: str) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in metrics.items():
        shown = "undefined" if math.isnan(value) else f"{value:.4f}" if abs(value) < 1e4 else f"{value:.0f}"
        table.add_row(name, shown)
    Console().print(table)


def predictions_table(
    task: Task, ids: list[str], patients: pd.Series, probs: torch.Tensor, targets: torch.Tensor
) -> pd.DataFrame:
    """One row per slice: image_id, patient, the truth, then `prob_<output>` per output.

    The truth is `target_<label>` (0/1) per output for sigmoid tasks, and for subtype one `target`
    column holding the subtype's name, so the file reads without the class order at hand.
    """
    table = pd.DataFrame({"image_id": ids})
    table["patient"] = table["image_id"].map(patients)
    truth = targets.numpy()
    if task.loss == "ce":
        table["target"] = [task.outputs[k] for k in truth]
    else:
        for k, name in enumerate(task.outputs):
            table[f"target_{name}"] = truth[:, k].astype(np.int64)
    for k, name in enumerate(task.outputs):
        table[f"prob_{name}"] = probs[:, k].numpy()
    return table


def file_digest(path: str | None) -> str | None:
    """SHA-256 of a file's bytes, so a copied weights file shares a cache and a retrained one does not."""
    if not path:
        return None
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: check the path given in the config.")
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
