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


def shift_table(results: dict[str, dict[str, dict[str, float]]], home: str) -> pd.DataFrame:
    """One row per training and test site (`results[training][site]`: that training's test metrics at `site`, the
    home site first): each figure with its interval, and at the other sites the drop (home - there) of DROPPED."""
    rows = []
    for training, by_site in results.items():
        for site, metrics in by_site.items():
            row: dict[str, object] = {"training": training, "site": site}
            for name in FIGURES:
                row[name], row[f"{name}_ci_low"], row[f"{name}_ci_high"] = figure(metrics, name)
            for name in DROPPED:
                row[f"{name}_drop"] = math.nan if site == home else figure(by_site[home], name)[0] - row[name]
            rows.append(row)
    return pd.DataFrame(rows)


def halved(table: pd.DataFrame, plain: str, augmented: str, site: str, name: str = "auroc") -> bool:
    """Whether the `augmented` training's drop of `name` at `site` is at most half the `plain` training's (which
    drops at all), and it does no worse there: a model worse at home drops less without being any more robust."""
    there = table[table["site"] == site].set_index("training")
    drops = there[f"{name}_drop"]
    return bool(drops[plain] > 0 and drops[augmented] <= drops[plain] / 2
                and there.loc[augmented, name] >= there.loc[plain, name])


def verdict(table: pd.DataFrame, plain: str, augmented: str, site: str, name: str = "auroc") -> str:
    """`met`, `NOT met`, or `no drop to halve` where the `plain` training loses nothing at `site`."""
    if not table[(table["site"] == site) & (table["training"] == plain)][f"{name}_drop"].iloc[0] > 0:
        return "no drop to halve"
    return "met" if halved(table, plain, augmented, site, name) else "NOT met"


def markdown(table: pd.DataFrame, home: str) -> str:
    """The table as Markdown: a row per training and test site, each figure with its 95% interval, and the drops."""
    header = ["training", "tested at", *(name.replace("op_", "op ") for name in FIGURES),
              *(f"{name.replace('op_', 'op ')} drop" for name in DROPPED)]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in table.to_dict("records"):
        site = f"{row['site']} (its own test patients)" if row["site"] == home else row["site"]
        cells = [str(row["training"]), site]
        cells += [f"{row[name]:.3f} [{row[f'{name}_ci_low']:.2f}, {row[f'{name}_ci_high']:.2f}]" for name in FIGURES]
        cells += ["" if math.isnan(row[f"{name}_drop"]) else f"{row[f'{name}_drop']:+.3f}" for name in DROPPED]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(path: Path, table: pd.DataFrame, home: str, preamble: str) -> str:
    """Write `preamble` and the Markdown table to `path` (atomically); returns the text written."""
    text = f"{preamble.rstrip()}\n\n{markdown(table, home)}"
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))
    return text
