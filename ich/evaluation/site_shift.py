"""The site-shift table: a model trained at one hospital, tested on its own test patients and at another's.

`python -m ich.site_shift` trains and evaluates (it may call train.py's and evaluate.py's `run`); this module
only reads their metrics: AUROC and operating-point sensitivity and specificity with their patient-bootstrap
intervals per training and test site, and what each training loses from its own site to the other.
"""

import math
from pathlib import Path

import pandas as pd

from ich.core.results import write_atomic

FIGURES = ("auroc", "op_sensitivity", "op_specificity")  # test/<figure> in metrics.json, with _ci_low and _ci_high
DROPPED = ("auroc", "op_sensitivity")  # the figures whose drop from the home site the table reports


def figure(metrics: dict[str, float], name: str) -> tuple[float, float, float]:
    """(value, interval low, interval high) of test/<name> in a metrics.json of train.py or evaluate.py."""
    key = f"test/{name}"
    if key not in metrics:
        raise KeyError(f"{key} is not in the metrics: evaluate a binary checkpoint (task=binary) with bootstrap > 0.")
    return metrics[key], metrics.get(f"{key}_ci_low", math.nan), metrics.get(f"{key}_ci_high", math.nan)


def shift_table(results: dict[str, dict[str, dict[str, float]]], home: str, away: str) -> pd.DataFrame:
    """One row per training (`results[training][site]` = that training's test metrics at `site`): each figure at
    the home and the away site with its interval, and the drop (home - away) of DROPPED."""
    rows = []
    for training, by_site in results.items():
        row: dict[str, object] = {"training": training}
        for site in (home, away):
            for name in FIGURES:
                value, low, high = figure(by_site[site], name)
                row[f"{name}_{site}"], row[f"{name}_{site}_ci"] = value, (low, high)
        for name in DROPPED:
            row[f"{name}_drop"] = row[f"{name}_{home}"] - row[f"{name}_{away}"]
        rows.append(row)
    return pd.DataFrame(rows)


def halved(table: pd.DataFrame, plain: str, augmented: str, name: str = "auroc") -> bool:
    """Whether the `augmented` training's drop of `name` is at most half the `plain` training's (and there is one)."""
    drops = table.set_index("training")[f"{name}_drop"]
    return bool(drops[plain] > 0 and drops[augmented] <= drops[plain] / 2)


def _cell(value: float, interval: tuple[float, float]) -> str:
    return f"{value:.3f} [{interval[0]:.2f}, {interval[1]:.2f}]"


def markdown(table: pd.DataFrame, home: str, away: str) -> str:
    """The table as Markdown: a row per training, each figure with its 95% interval, and the drops."""
    header = ["training"]
    for site in (home, away):
        header += [f"{name.replace('op_', 'op ')} {site}" for name in FIGURES]
    header += [f"{name.replace('op_', 'op ')} drop" for name in DROPPED]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in table.to_dict("records"):
        cells = [str(row["training"])]
        for site in (home, away):
            cells += [_cell(row[f"{name}_{site}"], row[f"{name}_{site}_ci"]) for name in FIGURES]
        cells += [f"{row[f'{name}_drop']:+.3f}" for name in DROPPED]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(path: Path, table: pd.DataFrame, home: str, away: str, preamble: str) -> str:
    """Write `preamble` and the Markdown table to `path` (atomically); returns the text written."""
    text = f"{preamble.rstrip()}\n\n{markdown(table, home, away)}"
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))
    return text
