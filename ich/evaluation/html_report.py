"""Evaluations and sweeps as one self-contained HTML page each: report.html and summary.html.

A report is read by people who did not run it (a radiologist, a reviewer), often offline or on paper, so the
page carries everything inline: the style sheet and every figure as a base64 PNG; no script, font or link.
It shows what was evaluated, the metrics at the fixed threshold and at the operating point with their
patient-bootstrap intervals, the curves with the operating point marked, calibration, confusion matrices,
and the slices the model got most wrong. Patients are counted, never listed: no patient or image id is
written, and the tiles of the worst mistakes are captioned by probability and truth only.
"""

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torchmetrics.functional.classification import binary_average_precision, binary_precision_recall_curve, binary_roc

from ich.core.results import write_atomic
from ich.data.seen import TrainingSource, ood_summary, training_source
from ich.evaluation.operating import (HEADLINE_LABEL, auroc, below_pooled, called, metric_sources,
                                     sensitivity_specificity)
from ich.evaluation.plots import confusion_counts, draw_confusion, draw_reliability

DPI = 110  # as the PNG files of ich.evaluation.plots
MISSING = "\u2013"  # a metric metrics.json does not hold
CHOSEN_ON_VALIDATION = "the validation patients"  # where a model's thresholds come from, unless evaluate.py chose them
Tile = tuple[np.ndarray, str]  # a windowed slice (HxW or HxWx3 uint8) and its caption
FOOTER = "Written by ich: one self-contained page (no scripts, fonts or links); patients are counted, not listed."

STYLE = """
:root { --ink: #1d2329; --muted: #5b6670; --rule: #d5dbe1; --band: #f2f5f8; --accent: #1f5fa8; }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1240px; padding: 24px 28px 40px; color: var(--ink); background: #fff;
       font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 28px 0 8px; padding-bottom: 4px; border-bottom: 2px solid var(--accent); }
p.note { color: var(--muted); margin: 6px 0 10px; max-width: 62em; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: 4px 10px; border-bottom: 1px solid var(--rule); text-align: left; vertical-align: top; }
thead th { background: var(--band); font-weight: 600; }
thead th.group { text-align: center; border-bottom: 1px solid var(--muted); }
td.num, th.num { text-align: right; white-space: nowrap; }
tr.summary td { background: #fafbfc; font-style: italic; }
table.about th { background: var(--band); font-weight: 600; width: 11em; }
span.ci { color: var(--muted); font-size: 12px; }
figure { margin: 0 0 12px; }
figure img { display: block; max-width: 100%; height: auto; }
.tiles { display: grid; grid-template-columns: repeat(auto-fill, minmax(190px, 1fr)); gap: 12px; }
figure.tile { border: 1px solid var(--rule); border-radius: 4px; overflow: hidden; }
figure.tile img { width: 100%; background: #000; }
figure.tile figcaption { padding: 4px 6px; font-size: 12px; white-space: pre-line; }
ul.every { columns: 3 20em; padding: 0; margin: 0; list-style: none; font-size: 12px; }
ul.every li { display: flex; justify-content: space-between; gap: 1em; break-inside: avoid;
              border-bottom: 1px dotted var(--rule); font-variant-numeric: tabular-nums; }
footer { margin-top: 32px; color: var(--muted); font-size: 12px; }
td.flag { color: #a3121f; font-weight: 600; }
.verdict { font-weight: 600; } .verdict.positive { color: #a3121f; } .verdict.negative { color: #1d6b35; }
p.verdict { font-size: 16px; margin: 4px 0 10px; }
.tiles.heatmaps { grid-template-columns: repeat(auto-fill, minmax(400px, 1fr)); }
p.banner { margin: 6px 0 14px; padding: 10px 14px; border-radius: 4px; font-size: 15px; }
p.banner.synthetic { background: #a3121f; color: #fff; font-weight: 700; font-size: 17px; }
p.banner.unknown { background: #fff3cd; color: #5c4400; border: 1px solid #e0b84c; font-weight: 600; }
p.banner.real { background: var(--band); }
.ood { color: #8a5a00; font-weight: 600; }
p.ood { background: #fff3cd; border-left: 4px solid #d08a00; padding: 6px 10px; max-width: 62em; }
@page { size: A4; margin: 12mm; }
@media print {
  body { max-width: none; padding: 0; font-size: 11px; }
  h2 { break-after: avoid; }
  table, figure, li { break-inside: avoid; }
  .tiles { grid-template-columns: repeat(6, 1fr); }
}
"""


# --- which slices were wrong --------------------------------------------------------------------------


def output_truth(predictions: pd.DataFrame, output: str) -> np.ndarray:
    """0/1 truth of one output per row: `target_<output>` of a sigmoid task, `target == output` for subtype."""
    if "target" in predictions:
        return (predictions["target"] == output).to_numpy(np.int64)
    return predictions[f"target_{output}"].to_numpy(np.int64)


def worst_cases(predictions: pd.DataFrame, output: str, threshold: float,
                k: int = 8) -> dict[str, list[tuple[str, str]]]:
    """The `k` most confident mistakes on `output` at `threshold`, worst first: {section title: [(image_id, caption)]}.

    False negatives are the positives with the lowest probabilities below the threshold, false positives the
    negatives with the highest at or above it. The caller loads each id's windowed slice and passes the tiles
    to write_report; the captions hold the probability and the slice's truth, never the id.
    """
    truth = output_truth(predictions, output).astype(bool)
    probs = predictions[f"prob_{output}"].to_numpy()
    decided = called(probs, threshold)
    rising = np.argsort(probs, kind="stable")
    falling = rising[::-1]
    missed = rising[(truth & ~decided)[rising]][:k]
    false_alarms = falling[(~truth & decided)[falling]][:k]

    def cases(rows: np.ndarray) -> list[tuple[str, str]]:
        return [(str(predictions["image_id"].iloc[row]),
                 f"p({output}) = {probs[row]:.3f}\ntruth: {_truth_of(predictions.iloc[row])}") for row in rows]

    return {f"Worst false negatives: {output}": cases(missed), f"Worst false positives: {output}": cases(false_alarms)}


def _truth_of(row: pd.Series) -> str:
    """A slice's labels in words: its subtype, or its positive labels (`negative` when none is)."""
    if "target" in row:
        return str(row["target"])
    positive = [column.removeprefix("target_") for column in row.index if column.startswith("target_") and row[column]]
    return ", ".join(positive) or "negative"


# --- the evaluation report ----------------------------------------------------------------------------


def write_report(
    path: Path | str,
    *,
    title: str,
    about: Mapping[str, str],
    metrics: Mapping[str, float | None],
    predictions: pd.DataFrame,
    outputs: Sequence[str],
    thresholds: Mapping[str, float] | None = None,
    fixed_threshold: float = 0.5,
    tiles: Mapping[str, Sequence[Tile]] | None = None,
    source: TrainingSource | None = None,
    chosen_on: str = CHOSEN_ON_VALIDATION,
) -> Path:
    """Write the evaluation's report.html (atomically) and return its path.

    Args:
        about: what was evaluated, shown first as given (checkpoint, model, data, what was skipped); the
            counts of slices, patients, exams and positives are added from `predictions` and `metrics`.
        metrics: the flat metrics.json values (`test/...`, `data/...`); a value it lacks shows as a dash.
        predictions: predictions.csv as ich.core.results.predictions_table writes it.
        outputs: the task's outputs, in order.
        thresholds: the operating threshold per output (the model's, chosen on the validation patients); with
            None the figures mark `fixed_threshold` and say that no operating point was given.
        fixed_threshold: the threshold of `test/sensitivity` and `test/specificity` (the task's threshold).
        tiles: section title -> windowed slices and captions, worst first (see worst_cases).
        source: what the model was trained on (ich.data.seen.training_source), the page's first line.
        chosen_on: where the operating thresholds were chosen, in words ("the validation patients").
    """
    path = Path(path)
    if thresholds is not None and set(outputs) - set(thresholds):
        raise ValueError(f"thresholds lacks {', '.join(sorted(set(outputs) - set(thresholds)))}: "
                         "pass one operating threshold per output, or None.")
    categorical = "target" in predictions
    points = {name: float(thresholds[name] if thresholds is not None else fixed_threshold) for name in outputs}
    # the second mark on the curves: the fixed threshold, unless it is the only one or subtype's argmax decides
    fixed = None if categorical or thresholds is None else fixed_threshold
    body = "\n".join([
        source_banner(source) if source is not None else "",
        _about_section(about, metrics, predictions, outputs),
        _metrics_section(metrics, predictions, outputs, fixed_threshold, categorical, chosen_on),
        _sources_section(metrics),
        _curves_section(predictions, outputs, points, fixed, thresholds is not None, chosen_on),
        _calibration_section(predictions, outputs),
        _confusion_section(predictions, outputs, points, categorical, thresholds is not None),
        _tiles_section(tiles or {}),
        _every_metric_section(metrics),
    ])
    document = page(title, body)
    write_atomic(path, lambda tmp: tmp.write_text(document, encoding="utf-8"))
    return path


def _about_section(about: Mapping[str, str], metrics: Mapping, predictions: pd.DataFrame,
                   outputs: Sequence[str]) -> str:
    rows = [*about.items(), ("test slices", f"{len(predictions):,}"),
            ("patients", f"{predictions['patient'].nunique():,} (pseudonymised; counted, not listed)")]
    if metrics.get("data/exams_test") is not None:
        rows.append(("exams", f"{int(metrics['data/exams_test']):,}"))
    rows.append(("positive slices", ", ".join(f"{name} {output_truth(predictions, name).sum():,}" for name in outputs)))
    cells = "".join(f"<tr><th>{html.escape(str(key))}</th><td>{html.escape(str(value))}</td></tr>"
                    for key, value in rows)
    return section("about", "What was evaluated", f'<table class="about">{cells}</table>')


def _metrics_section(metrics: Mapping, predictions: pd.DataFrame, outputs: Sequence[str], fixed_threshold: float,
                     categorical: bool, chosen_on: str) -> str:
    fixed = "highest probability" if categorical else f"threshold {fixed_threshold:g}"
    head = (
        '<thead><tr><th rowspan="2">output</th><th rowspan="2" class="num">positive / slices</th>'
        '<th rowspan="2" class="num">AUROC</th><th rowspan="2" class="num">ECE</th>'
        f'<th colspan="2" class="group">at {fixed}</th><th colspan="3" class="group">at the operating point</th></tr>'
        '<tr><th class="num">sensitivity</th><th class="num">specificity</th><th class="num">threshold</th>'
        '<th class="num">sensitivity</th><th class="num">specificity</th></tr></thead>'
    )
    several = len(outputs) > 1
    rows = []
    for name in outputs:
        suffix = f"_{name}" if several else ""
        truth = output_truth(predictions, name)
        rows.append(_row(name, f"{truth.sum():,} / {len(truth):,}", [
            _interval(metrics, "auroc", suffix), _value(metrics, f"test/ece{suffix}"),
            _value(metrics, f"test/sensitivity{suffix}"), _value(metrics, f"test/specificity{suffix}"),
            _value(metrics, f"test/op_threshold{suffix}", "{:.3g}"),
            _interval(metrics, "op_sensitivity", suffix), _interval(metrics, "op_specificity", suffix),
        ]))
    if several:
        rows.append(_row("mean over outputs", "", [
            _interval(metrics, "auroc", ""), "", _value(metrics, "test/sensitivity"),
            _value(metrics, "test/specificity"), "", "", "",
        ], summary=True))
    if "test/exam_auroc" in metrics:
        exams = metrics.get("data/exams_test")
        rows.append(_row("exams (studies)", MISSING if exams is None else f"{int(exams):,} exams", [
            _interval(metrics, "exam_auroc", ""), "", "", "", _value(metrics, "test/exam_op_threshold", "{:.3g}"),
            _interval(metrics, "exam_op_sensitivity", ""), _interval(metrics, "exam_op_specificity", ""),
        ], summary=True))
    note = (
        "A slice is called positive when its probability is at least the threshold. The operating point is the "
        f"model's threshold per output, chosen on {chosen_on} (a fixed threshold is none). "
        "[low, high]: 95% interval from resampling patients (bootstrap), where metrics.json holds one; "
        f"ECE: expected calibration error over equal-mass bins; {MISSING}: not in metrics.json; "
        "n/a: undefined on these slices (a class absent)."
    )
    if categorical:
        note += " At highest probability: the subtype given the highest probability is the prediction."
    table = f'<table class="metrics">{head}<tbody>{"".join(rows)}</tbody></table>'
    return section("metrics", "Metrics", table, note)


def _sources_section(metrics: Mapping) -> str:
    """Per source of a several-source test split (data=multi), beside the pooled figures; a source whose AUROC
    interval lies wholly below the pooled one is flagged. Nothing when metrics.json holds no source of its own."""
    sources = metric_sources(metrics)
    if not sources:
        return ""
    head = ('<thead><tr><th>source</th><th class="num">patients</th><th class="num">AUROC</th>'
            '<th class="num">sensitivity at the operating point</th>'
            '<th class="num">specificity at the operating point</th>'
            '<th>flag</th></tr></thead>')
    rows = []
    for name in sources:
        patients = metrics.get(f"data/{name}/patients_test")
        flag = "AUROC interval below the pooled one" if below_pooled(metrics, name) else ""
        cells = [_interval(metrics, f"{name}/{key}", "") for key in ("auroc", "op_sensitivity", "op_specificity")]
        shown = "".join(f'<td class="num">{cell}</td>' for cell in cells)
        rows.append(f'<tr><td>{html.escape(name)}</td><td class="num">{_count(patients)}</td>{shown}'
                    f'<td class="flag">{flag}</td></tr>')
    pooled = [_interval(metrics, key, "") for key in ("auroc", "op_sensitivity", "op_specificity")]
    rows.append('<tr class="summary"><td>pooled</td>'
                f'<td class="num">{_count(metrics.get("data/patients_test"))}</td>'
                + "".join(f'<td class="num">{cell}</td>' for cell in pooled) + "<td></td></tr>")
    note = ("Each source's test patients alone, at the model's one operating point; [low, high]: 95% interval from "
            "resampling that source's patients. A flag marks a source whose AUROC interval lies wholly below the "
            "pooled one: the model does worse there than chance explains.")
    return section("sources", "Per source", f'<table class="sources">{head}<tbody>{"".join(rows)}</tbody></table>',
                   note)


def _count(value: float | None) -> str:
    return MISSING if value is None or math.isnan(value) else f"{int(value):,}"


def _row(name: str, count: str, cells: list[str], summary: bool = False) -> str:
    shown = "".join(f'<td class="num">{cell}</td>' for cell in cells)
    kind = ' class="summary"' if summary else ""
    return f'<tr{kind}><td>{html.escape(name)}</td><td class="num">{count}</td>{shown}</tr>'


def _value(metrics: Mapping, key: str, form: str = "{:.3f}") -> str:
    """One metric as shown: a dash where metrics.json lacks it, n/a where it is undefined (null or NaN)."""
    if key not in metrics:
        return MISSING
    value = metrics[key]
    return "n/a" if value is None or math.isnan(value) else form.format(value)


def _interval(metrics: Mapping, name: str, suffix: str) -> str:
    """`test/<name><suffix>` and, where present, its interval `test/<name>_ci_low<suffix>` .. `_ci_high<suffix>`."""
    shown = _value(metrics, f"test/{name}{suffix}")
    low, high = f"test/{name}_ci_low{suffix}", f"test/{name}_ci_high{suffix}"
    if low in metrics and high in metrics:
        shown += f' <span class="ci">[{_value(metrics, low)}, {_value(metrics, high)}]</span>'
    return shown


def _curves_section(predictions: pd.DataFrame, outputs: Sequence[str], points: Mapping[str, float],
                    fixed: float | None, chosen: bool, chosen_on: str) -> str:
    figures = [
        figure_tag(_curve_figure(name, output_truth(predictions, name), predictions[f"prob_{name}"].to_numpy(),
                              points[name], fixed, chosen), f"ROC and precision-recall curves of {name}")
        for name in outputs
    ]
    if not chosen:
        note = f"No operating thresholds were given: the dot marks threshold {next(iter(points.values())):g}."
    else:
        note = f"The red dot marks the operating point (the model's threshold, chosen on {chosen_on})"
        note += f"; the open square, threshold {fixed:g}." if fixed is not None else "."
    return section("curves", "ROC and precision-recall curves", "".join(figures), note)


def _curve_figure(name: str, truth: np.ndarray, probs: np.ndarray, point: float, fixed: float | None,
                  chosen: bool) -> Figure:
    """ROC (left) and precision-recall (right) of one output, its operating point (and the fixed threshold) marked."""
    figure = Figure(figsize=(8.4, 4.0), layout="constrained")
    roc_ax, pr_ax = figure.subplots(1, 2)
    positives = int(truth.sum())
    for ax, xlabel, ylabel in ((roc_ax, "1 - specificity (false positive rate)", "sensitivity"),
                               (pr_ax, "recall (sensitivity)", "precision")):
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.02)
        ax.set_aspect("equal")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    if positives in (0, len(truth)):
        for ax in (roc_ax, pr_ax):
            ax.text(0.5, 0.5, "one class only in these slices:\nno curve", ha="center", va="center")
        roc_ax.set_title(f"{name}: ROC")
        pr_ax.set_title(f"{name}: precision-recall")
        return figure
    scores, target = torch.tensor(probs, dtype=torch.float32), torch.tensor(truth)
    fpr, tpr, _ = binary_roc(scores, target)
    precision, recall, _ = binary_precision_recall_curve(scores, target)
    roc_ax.plot([0, 1], [0, 1], linestyle="--", linewidth=0.8, color="grey", label="chance")
    roc_ax.plot(fpr.numpy(), tpr.numpy(), color="C0", linewidth=1.8, label=f"AUROC {auroc(probs, truth):.3f}")
    pr_ax.axhline(positives / len(truth), linestyle="--", linewidth=0.8, color="grey",
                  label=f"prevalence {positives / len(truth):.3f}")
    pr_ax.plot(recall.numpy(), precision.numpy(), color="C0", linewidth=1.8,
               label=f"average precision {float(binary_average_precision(scores, target)):.3f}")
    operating = "operating point" if chosen else "threshold"
    marks = [(point, f"{operating} {point:.3g}", dict(marker="o", color="C3", markersize=8))]
    if fixed is not None:
        square = dict(marker="s", markerfacecolor="none", color="black", markersize=8)
        marks.append((fixed, f"threshold {fixed:g}", square))
    for threshold, label, style in marks:
        sensitivity, specificity = sensitivity_specificity(probs, truth, threshold)
        decided = called(probs, threshold)
        precision_at = float(truth[decided].mean()) if decided.any() else float("nan")
        roc_ax.plot(1 - specificity, sensitivity, linestyle="none", **style,
                    label=f"{label}: sens {sensitivity:.2f}, spec {specificity:.2f}")
        pr_ax.plot(sensitivity, precision_at, linestyle="none", **style,
                   label=f"{label}: recall {sensitivity:.2f}, precision {precision_at:.2f}")
    roc_ax.set_title(f"{name}: ROC ({positives} positive, {len(truth) - positives} negative slices)", fontsize=10)
    pr_ax.set_title(f"{name}: precision-recall", fontsize=10)
    roc_ax.legend(loc="lower right", fontsize=7.5)
    pr_ax.legend(loc="lower left", fontsize=7.5)
    return figure


def _calibration_section(predictions: pd.DataFrame, outputs: Sequence[str]) -> str:
    figure = Figure(figsize=(5.6, 5.2), layout="constrained")
    ax = figure.subplots()
    draw_reliability(ax, [(name, predictions[f"prob_{name}"].to_numpy(), output_truth(predictions, name), "-", k)
                          for k, name in enumerate(outputs)])
    ax.set_title("Reliability (10 equal-mass bins)", fontsize=10)
    note = (f"The slices sorted by probability, cut into 10 bins of about {len(predictions) / 10:.0f} each: a "
            "calibrated model's points lie on the diagonal; below it, the model is over-confident.")
    return section("calibration", "Calibration", figure_tag(figure, "reliability diagram"), note)


def _confusion_section(predictions: pd.DataFrame, outputs: Sequence[str], points: Mapping[str, float],
                       categorical: bool, chosen: bool) -> str:
    panels = [
        (f"{name} at threshold {points[name]:.3g}",
         confusion_counts(output_truth(predictions, name),
                          called(predictions[f"prob_{name}"].to_numpy(), points[name]), 2),
         ("no", "yes"))
        for name in outputs
    ]
    figures = [figure_tag(_confusion_figure(panels, side=3.4), "confusion matrices at the operating point")]
    if categorical:
        truth = predictions["target"].map({name: k for k, name in enumerate(outputs)}).to_numpy()
        predicted = predictions[[f"prob_{name}" for name in outputs]].to_numpy().argmax(axis=1)
        counts = confusion_counts(truth, predicted, len(outputs))
        figures.append(figure_tag(_confusion_figure([("subtype (highest probability)", counts, outputs)], side=5.6),
                               "confusion matrix of the subtypes"))
    note = "Rows are the truth, columns the prediction; each cell holds the count and the share of its row."
    if not chosen:
        note = "No operating thresholds were given: each output at the fixed threshold. " + note
    return section("confusion", "Confusion matrices at the operating point", "".join(figures), note)


def _confusion_figure(panels: list[tuple[str, np.ndarray, Sequence[str]]], side: float) -> Figure:
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    figure = Figure(figsize=(side * columns, side * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    for ax, (title, counts, names) in zip(axes.flat, panels):
        draw_confusion(ax, counts, names, title)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    return figure


def _tiles_section(tiles: Mapping[str, Sequence[Tile]]) -> str:
    if not tiles:
        return section("cases", "Worst mistakes", "", "No slices were given for this report.")
    parts = []
    for heading, cases in tiles.items():
        grid = "".join(tile_tag(image, caption) for image, caption in cases) or '<p class="note">none</p>'
        parts.append(f"<h3>{html.escape(heading)}</h3><div class=\"tiles\">{grid}</div>")
    note = "The windowed slices the model got most wrong at the operating point, most confident first."
    return section("cases", "Worst mistakes", "".join(parts), note)


def tile_tag(image: np.ndarray, caption: str) -> str:
    """A windowed slice (HxW or HxWx3 uint8) inline as a captioned PNG tile of a `tiles` grid."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3))):
        raise ValueError(f"A tile is a windowed slice as HxW or HxWx3 uint8, not {image.dtype} {image.shape}: "
                         "pass one window's plane (or three as RGB) as the data module reads them.")
    buffer = io.BytesIO()
    matplotlib.image.imsave(buffer, image.squeeze(axis=2) if image.ndim == 3 and image.shape[2] == 1 else image,
                            cmap="gray", vmin=0, vmax=255, format="png")
    text = html.escape(caption)
    image_tag = f'<img src="{_data_uri(buffer.getvalue())}" alt="{text}">'
    return f'<figure class="tile">{image_tag}<figcaption>{text}</figcaption></figure>'


def _every_metric_section(metrics: Mapping) -> str:
    items = "".join(f"<li><span>{html.escape(key)}</span><span>{_value(metrics, key, _form(key, value))}</span></li>"
                    for key, value in sorted(metrics.items()))
    return section("every-metric", "Every value in metrics.json", f'<ul class="every">{items}</ul>')


def _form(key: str, value: float | None) -> str:
    """Counts (`data/...`) and large values as whole numbers, the rest with four decimals, as print_metrics."""
    return "{:.0f}" if key.startswith("data/") or (value is not None and abs(value) >= 1e4) else "{:.4f}"


# --- the sweep summary --------------------------------------------------------------------------------


def write_summary(path: Path | str, table: pd.DataFrame, metric: str, *, title: str) -> Path:
    """Write a sweep's summary.html (atomically): a bar chart of `metric` per job and the table as given.

    Args:
        table: one row per job, `run` (its name) first, with the columns to show (ich.report's markdown columns).
        title: the page's heading (ich.report's markdown heading: jobs, sort order).
    """
    path = Path(path)
    chart = figure_tag(summary_figure(table, metric), f"{metric} per job")
    words = ("run", "status", "job")
    head = "".join(f"<th>{html.escape(str(column))}</th>" if column in words else
                   f'<th class="num">{html.escape(str(column))}</th>' for column in table.columns)
    rows = "".join(
        "<tr>" + "".join(_summary_cell(value) for value in row) + "</tr>"
        for row in table.itertuples(index=False)
    )
    body = (section("chart", f"{metric} per job", chart)
            + section("jobs", "Jobs", f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>",
                       f"{MISSING}: the job has no value (failed, still running, or the metric is undefined)."))
    document = page(title, body)
    write_atomic(path, lambda tmp: tmp.write_text(document, encoding="utf-8"))
    return path


def _summary_cell(value) -> str:
    if isinstance(value, float):
        shown = MISSING if math.isnan(value) else f"{value:.4f}" if abs(value) < 1e4 else f"{value:.0f}"
        return f'<td class="num">{shown}</td>'
    return f"<td>{html.escape(str(value))}</td>"


def summary_figure(table: pd.DataFrame, metric: str) -> Figure:
    """Horizontal bars of the metric per job, in the table's order (best first) from the top; jobs without a
    value are left out and counted in the title."""
    scored = table[table[metric].notna()]
    label_width = 0.07 * max((len(str(name)) for name in scored["run"]), default=10)
    figure = Figure(figsize=(5 + label_width, 1.2 + 0.4 * max(len(scored), 1)), layout="constrained")
    ax = figure.subplots()
    ax.barh(range(len(scored)), scored[metric], color="C0")
    ax.set_yticks(range(len(scored)), scored["run"], fontsize=8)
    ax.invert_yaxis()
    for y, value in enumerate(scored[metric]):
        ax.text(value, y, f" {value:.4f}", va="center", fontsize=8)
    ax.set_xlabel(metric)
    left_out = len(table) - len(scored)
    ax.set_title(f"{metric} per job" + (f" ({left_out} without a value not shown)" if left_out else ""), fontsize=10)
    ax.margins(x=0.15)
    return figure


# --- the page -----------------------------------------------------------------------------------------


def page(title: str, body: str, footer: str = FOOTER) -> str:
    """The whole self-contained document: the style sheet inline, `body` (sections), and `footer` as given."""
    heading = html.escape(title)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{heading}</title>
<style>{STYLE}</style>
</head>
<body>
<header><h1>{heading}</h1></header>
<main>
{body}
</main>
<footer>{html.escape(footer)}</footer>
</body>
</html>
"""


def source_banner(source: TrainingSource) -> str:
    """The training source as a page's first line: red for synthetic data, amber when the checkpoint does not say."""
    return f'<p class="banner {source.level}">{html.escape(source.text)}</p>'


def section(anchor: str, heading: str, body: str, note: str = "") -> str:
    """One titled section of a page, reachable as #anchor, with an optional muted note under its heading."""
    shown = f'<p class="note">{html.escape(note)}</p>' if note else ""
    return f'<section id="{anchor}"><h2>{html.escape(heading)}</h2>{shown}{body}</section>'


def figure_tag(figure: Figure, alt: str) -> str:
    """A matplotlib figure inline as a PNG: the page needs no file beside it."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return f'<figure><img src="{_data_uri(buffer.getvalue())}" alt="{html.escape(alt)}"></figure>'


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def write_evaluation_report(path: str | Path, *, title: str, checkpoint: str | Path, data: str, model, datamodule,
                            metrics: Mapping[str, float | None], predictions: pd.DataFrame, tiles_per_case: int = 8,
                            ood: pd.DataFrame | None = None, chosen_on: str = CHOSEN_ON_VALIDATION) -> Path:
    """report.html of a tested checkpoint: first what it was trained on, then the model's thresholds (the operating
    point) and, as tiles, the worst false negatives and false positives of the headline output, read from the data
    module's test split (the labelled slice itself, first window). `ood`: the test series' flags (ich.data.seen.ood_table),
    summed up in the first table. `chosen_on`: where the model's thresholds were chosen, in words."""
    outputs = model.task.outputs
    inputs = model.hparams.get("inputs") or {}
    thresholds = dict(zip(outputs, model.op_thresholds.cpu().tolist()))
    headline = HEADLINE_LABEL if HEADLINE_LABEL in outputs else outputs[0]
    test = datamodule.datasets["test"]
    row_of = {image_id.decode(): i for i, image_id in enumerate(test.image_ids)}
    centre = test.stacks.shape[1] // 2  # the labelled slice, not its context neighbours
    cases = worst_cases(predictions, headline, thresholds[headline], k=tiles_per_case)
    tiles = {heading: [(test.loader(int(test.stacks[row_of[image_id], centre]))[0], caption) for image_id, caption in rows]
             for heading, rows in cases.items()}
    skipped = ", ".join(f"{reason}: {count}" for reason, count in datamodule.summary.get("skipped", {}).items()) or "none"
    about = {"checkpoint": str(checkpoint), "data": data, "skipped": skipped}
    if ood is not None:
        about["out of distribution"] = ood_summary(ood)
    about["operating point"] = f"chosen on {chosen_on}"
    return write_report(path, title=title, about=about, metrics=metrics, predictions=predictions, outputs=outputs,
                        thresholds=thresholds, fixed_threshold=float(model.hparams.threshold), tiles=tiles,
                        source=training_source(inputs), chosen_on=chosen_on)
