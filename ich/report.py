"""Summarise a multirun: `python -m ich.report multirun/<date>/<time>` writes summary.md, summary.csv and
summary.png into that folder, one row per job, best first by the optimised metric.

Each job folder holds `.hydra/overrides.yaml` (what the job changed) and, when it finished, `metrics.json`.
A row is named by the overrides that differ between jobs, so `-m model=resnet18,densenet121
task=binary,multilabel` gives rows like `model=densenet121 task=binary`. Jobs without metrics.json are
listed at the bottom (status `no metrics.json`: failed, or still running), never dropped.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from ich.evaluation.html_report import summary_figure, write_summary

DEFAULT_METRIC = "val/loss_best"
# The columns of the markdown table after the optimised metric (the CSV has every metric).
SHOWN = ("val/loss_best", "val/auroc_best", "test/auroc", "test/op_sensitivity", "test/op_specificity", "test/acc",
         "test/sensitivity", "test/specificity", "test/f1", "test/logloss_weighted", "time/fit_seconds")


def find_jobs(sweep_dir: Path) -> list[Path]:
    """Every Hydra job folder under `sweep_dir` (at any depth, so nested sweeps work too)."""
    return sorted(path.parent.parent for path in sweep_dir.rglob(".hydra/overrides.yaml"))


def collect(sweep_dir: Path) -> pd.DataFrame:
    """One row per job: `job` (folder relative to sweep_dir), `overrides`, `status`, then every metric."""
    rows = []
    for job in find_jobs(sweep_dir):
        overrides = OmegaConf.to_container(OmegaConf.load(job / ".hydra" / "overrides.yaml"))
        metrics_file = job / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        rows.append({
            "job": str(job.relative_to(sweep_dir)),
            "overrides": list(overrides),
            "status": "done" if metrics_file.is_file() else "no metrics.json",
            "optimized_metric": _configured_metric(job),
            **{name: math.nan if value is None else value for name, value in metrics.items()},
        })
    return pd.DataFrame(rows)


def _configured_metric(job: Path) -> str | None:
    config = job / ".hydra" / "config.yaml"
    return OmegaConf.load(config).get("optimized_metric") if config.is_file() else None


def name_rows(table: pd.DataFrame) -> pd.Series:
    """Each job's overrides without those every job shares: what tells the jobs apart."""
    shared = set.intersection(*(set(o) for o in table["overrides"])) if len(table) else set()
    return table["overrides"].map(
        lambda overrides: " ".join(_short(o) for o in overrides if o not in shared) or "(defaults)"
    )


def _short(override: str) -> str:
    """`optimizer.lr=6.573214670265966e-05` as `optimizer.lr=6.57e-05`: sampled values are long."""
    key, _, value = override.partition("=")
    try:
        number = float(value)
    except ValueError:
        return override
    return f"{key}={number:.3g}" if len(value) > 8 else override


def higher_is_better(metric: str) -> bool:
    """Losses go down, everything else (accuracy, AUROC, F1, ...) goes up."""
    return "loss" not in metric.rsplit("/", 1)[-1]


def summarize(sweep_dir: Path, metric: str | None = None) -> pd.DataFrame:
    """The ranked table of a sweep, also written as summary.csv, summary.md and summary.png in `sweep_dir`."""
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir} does not exist: pass the folder that `train.py -m` printed.")
    table = collect(sweep_dir)
    if table.empty:
        raise FileNotFoundError(
            f"No job folders (with .hydra/overrides.yaml) under {sweep_dir}: pass a multirun folder of train.py -m."
        )
    metric = metric or next((m for m in table["optimized_metric"].dropna()), None) or DEFAULT_METRIC
    table.insert(0, "run", name_rows(table))
    if metric not in table:
        table[metric] = math.nan
    table = table.sort_values(metric, ascending=not higher_is_better(metric), na_position="last", kind="stable")
    table = table.drop(columns=["overrides", "optimized_metric"]).reset_index(drop=True)
    columns = ["run", metric, *(c for c in table.columns if c not in ("run", metric))]
    table = table[columns]
    table.to_csv(sweep_dir / "summary.csv", index=False)
    (sweep_dir / "summary.md").write_text(markdown(table, metric))
    save_bar_chart(sweep_dir / "summary.png", table, metric)
    write_summary(sweep_dir / "summary.html", table[shown_columns(table, metric)], metric, title=markdown(table, metric).splitlines()[0].lstrip("# "))
    return table


def shown_columns(table: pd.DataFrame, metric: str) -> list[str]:
    """The columns summary.md and summary.html show: the job's name, the sort metric, the main metrics."""
    return ["run", metric, *(c for c in SHOWN if c in table and c != metric), "status", "job"]


def markdown(table: pd.DataFrame, metric: str) -> str:
    """A GitHub table of the main metrics, best first; '-' where a metric is undefined or the job failed."""
    columns = shown_columns(table, metric)
    better = "higher" if higher_is_better(metric) else "lower"
    lines = [
        f"# Sweep summary: {len(table)} jobs, sorted by {metric} ({better} is better)",
        "",
        "| " + " | ".join(columns) + " |",
        "| " + " | ".join("---" if c in ("run", "status", "job") else "---:" for c in columns) + " |",
    ]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(_cell(row[c]) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4f}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value).replace("|", "\\|")


def save_bar_chart(path: Path, table: pd.DataFrame, metric: str) -> None:
    """Horizontal bars of the metric per job, best at the top (the chart summary.html shows)."""
    summary_figure(table, metric).savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ich.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="the multirun folder, e.g. multirun/2024-05-01/14-03-22")
    parser.add_argument("--metric", help="sort by this metric instead of the jobs' optimized_metric")
    args = parser.parse_args(argv)
    try:
        table = summarize(args.sweep_dir, args.metric)
    except FileNotFoundError as err:
        print(f"Error: {err}", file=sys.stderr)
        sys.exit(1)
    print(markdown(table, args.metric or table.columns[1]))
    print(f"Wrote summary.md, summary.csv and summary.png to {args.sweep_dir}")


if __name__ == "__main__":
    main()
