"""Writing and showing results: flat metrics as JSON and as a table on the console."""

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Let `write` fill a temporary file, then rename it over `path`: a killed process never leaves half a file.

    The temporary name carries the process id, since the ranks of one DDP job may write the same file at once.
    """
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def write_json(path: Path, payload: dict) -> None:
    """Metrics as JSON, atomically. NaN (a metric undefined on this data, such as AUROC without
    positives) becomes null: valid JSON."""
    clean = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in payload.items()}
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(clean, indent=2, sort_keys=True)))


def print_metrics(metrics: dict[str, float], title: str) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in metrics.items():
        shown = "undefined" if math.isnan(value) else f"{value:.4f}" if abs(value) < 1e4 else f"{value:.0f}"
        table.add_row(name, shown)
    Console().print(table)
