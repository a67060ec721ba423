"""What a model has seen in training, kept in its checkpoint, and how a new series compares with it.

A model trained on the built-in phantom answers a real head CT with confident probabilities, and nothing in them
says that the answer means nothing. So a checkpoint's `inputs` (ICHDataModule.inputs) carry two entries made here:

- `trained_on`: the data group (phantom, rsna, images, nifti), the phantom's settings, and whether the data is
  synthetic. Every report names it in its first lines (`training_source`), loudly for the phantom.
- `seen`: per figure of a series (FIGURES), the range the training patients' series span. A series of a new study
  whose figure lies outside it is out of distribution (`outside`): studies.csv and the reports say which figure, its
  value and the range. The flag only reports: probabilities and decisions never depend on it.

What it checks is what a scanner changes: slice spacing, field of view, the HU of the head, noise. What it does not
check is anatomy and pathology (a bleed unlike any in training, a child's head, a post-operative skull) and
everything else inside the ranges: a series inside every range may still be one the model gets wrong.
"""

import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

SYNTHETIC = ("phantom",)  # data groups that are drawn by a program, not scanned
DESCRIBED = {"rsna": "DICOM slices in the RSNA layout", "images": "PNG/JPG slices", "nifti": "NIfTI volumes"}
# The training range of a figure is its 1st to 99th percentile over the training series, widened on each side by
# MARGIN of its width and at least by the figure's floor. Percentiles, so that one odd training series (a quirk, a
# cut-short scan) does not stretch it; a range rather than a z-score, because some figures take a few values only
# (every phantom and most RSNA series are 5 mm apart: a standard deviation of 0 would make any other spacing
# infinitely far) and because "10 mm outside training's 4.5 to 5.5" reads without statistics; widened, because the
# percentiles of a few dozen series understate how far the population they come from spreads.
PERCENTILES = (1.0, 99.0)
MARGIN = 0.25


@dataclass(frozen=True)
class Figure:
    """One figure of a series: in words, and the least margin on each side of its training range (its unit)."""

    what: str
    floor: float


# Figures of a series. slice_spacing_mm comes from the slices' positions (slice_spacing), the others are each the
# median over the series' slices of an index column (ich.data.index: head_figures, field_of_view_mm). The floors are
# differences that do not change what a model sees: 0.5 mm of spacing (thick series are reconstructed at 4.5 to
# 5 mm), 15 mm of field (6% of a 250 mm field: heads differ more), 10 HU (twice the +-4 HU of water that CT quality
# control allows), 0.05 of the head in the brain's range, 2 HU of noise.
FIGURES = {
    "slice_spacing_mm": Figure("distance between neighbouring slices, mm", 0.5),
    "field_of_view_mm": Figure("side of the square each slice is fitted into, mm", 15.0),
    "head_hu_median": Figure("median HU inside the head", 10.0),
    "head_brain_fraction": Figure("share of the head in the brain's HU range", 0.05),
    "brain_noise_hu": Figure("noise of soft tissue, HU", 2.0),
}
SLICE_FIGURES = tuple(name for name in FIGURES if name != "slice_spacing_mm")  # index columns, one value per slice
UNKNOWN_SOURCE = ("Training source unknown: this checkpoint predates ich recording it; train it again to have it "
                  "named here.")


# --- where the model's training data came from -----------------------------------------------------------------


def trained_on(source: str, phantom: Mapping, sources: Mapping[str, dict] | None = None) -> dict:
    """The `trained_on` entry of a checkpoint's inputs: the data group, the phantom's settings, synthetic or not;
    for data=multi each source's own entry (`sources`), synthetic when any of them is."""
    if source == "multi":
        parts = dict(sources or {})
        return {"data": source, "synthetic": any(part["synthetic"] for part in parts.values()), "sources": parts}
    entry = {"data": source, "synthetic": source in SYNTHETIC}
    if source == "phantom":
        entry["phantom"] = dict(phantom)
    return entry


@dataclass(frozen=True)
class TrainingSource:
    """What a report says first of the model: `text`, and `level`: `synthetic` (said loudly: its verdict on a real
    scan means nothing), `unknown` (a checkpoint older than the record) or `real`."""

    text: str
    level: str

    @property
    def loud(self) -> bool:
        return self.level != "real"


def training_source(inputs: Mapping) -> TrainingSource:
    """The training source a checkpoint's (or an exported model's) inputs record, in one sentence."""
    entry = inputs.get("trained_on")
    if not entry:
        return TrainingSource(UNKNOWN_SOURCE, "unknown")
    data = entry["data"]
    if data == "multi":
        parts = {name: training_source({"trained_on": part}) for name, part in entry["sources"].items()}
        said = " ".join(f"{name}: {part.text}" for name, part in parts.items())  # each a sentence of its own
        level = "synthetic" if entry["synthetic"] else "real"
        return TrainingSource(f"Trained on several sources (data=multi). {said}", level)
    if data == "phantom":
        settings = ", ".join(f"{key} {value}" for key, value in entry.get("phantom", {}).items())
        return TrainingSource(f"Trained on the synthetic phantom (data=phantom{': ' + settings if settings else ''}): "
                              "its verdict on a real scan means nothing.", "synthetic")
    if entry.get("synthetic"):
        return TrainingSource(f"Trained on synthetic data (data={data}): its verdict on a real scan means nothing.",
                              "synthetic")
    return TrainingSource(f"Trained on data={data} ({DESCRIBED.get(data, 'real scans')}).", "real")


def announce(inputs: Mapping) -> TrainingSource:
    """The training source of a model just loaded, logged as a warning when it is synthetic or unknown."""
    source = training_source(inputs)
    log.log(logging.WARNING if source.loud else logging.INFO, "%s", source.text)
    return source


# --- the figures of a series -------------------------------------------------------------------------------


def slice_spacing(positions: np.ndarray) -> float:
    """The median distance (mm) between neighbouring slices of a series, positions given in slice order; nan with
    fewer than two known positions (a series ordered by InstanceNumber has none)."""
    known = positions[np.isfinite(positions)]
    return float(np.median(np.abs(np.diff(known)))) if len(known) > 1 else math.nan


def series_figures(slices: pd.DataFrame) -> pd.DataFrame:
    """One row per series of an index (or of a study's slices as prediction reads them), indexed by `series`, with the
    FIGURES the table has columns for: each slice figure's median over the series' slices, the slice spacing of
    its positions. Image folders have no HU, positions or field of view: their table has no figure column."""
    if "series" not in slices or slices.empty:
        return pd.DataFrame(index=pd.Index([], name="series"))
    ordered = slices.sort_values(["series", "slice_index"], kind="stable") if "slice_index" in slices else slices
    groups = ordered.groupby("series", sort=False)
    table = pd.DataFrame(index=pd.Index(list(groups.groups), name="series"))
    if "position" in ordered:
        table["slice_spacing_mm"] = groups["position"].agg(lambda p: slice_spacing(p.to_numpy(np.float64)))
    for name in SLICE_FIGURES:
        if name in ordered:
            table[name] = groups[name].median()
    return table


def seen_ranges(figures: pd.DataFrame) -> dict:
    """The `seen` entry of a checkpoint's inputs, from the figures of its training series (series_figures): how many
    series, and per figure the 1st and 99th percentile and the range a new series must lie in (PERCENTILES, MARGIN,
    each figure's floor). A figure no training series has is left out, and so never checked."""
    ranges = {}
    for name, figure in FIGURES.items():
        values = figures[name].dropna().to_numpy() if name in figures else np.array([])
        if not len(values):
            continue
        low, high = np.percentile(values, PERCENTILES)
        margin = max(MARGIN * (high - low), figure.floor)
        ranges[name] = {"p01": float(low), "p99": float(high), "low": float(low - margin), "high": float(high + margin)}
    return {"series": int(len(figures)), "figures": ranges}


def outside(figures: Mapping[str, float], seen: Mapping) -> dict[str, str]:
    """Why a series is out of distribution: per figure outside its training range, a phrase such as
    `slice_spacing_mm 10 outside training's 4.5 to 5.5`; empty when every figure is inside. A figure the series lacks
    (nan) is not checked, nor one the checkpoint has no range for."""
    reasons = {}
    for name, bounds in seen["figures"].items():
        value = figures.get(name, math.nan)
        if not math.isnan(value) and not bounds["low"] <= value <= bounds["high"]:
            reasons[name] = f"{name} {value:.3g} outside training's {bounds['low']:.3g} to {bounds['high']:.3g}"
    return reasons


def not_checked(inputs: Mapping) -> str:
    """Why a model's inputs allow no out-of-distribution check ("" when they do), said as `unknown: ...`."""
    seen = inputs.get("seen")
    if seen is None:
        return "unknown: this checkpoint predates ich recording its training figures; train it again to have it checked"
    if not seen["figures"]:
        return (f"unknown: its training data (data={inputs.get('trained_on', {}).get('data', '?')}) gave no figures "
                "to compare with (image folders carry no HU, positions or field of view)")
    return ""


def flag(series: Sequence[tuple[str, Mapping[str, float]]], inputs: Mapping) -> tuple[float, str]:
    """A study's flag from the figures of the series it is read on (name, figures): 1 and why when any series lies
    outside the training ranges, 0 and "" when all lie inside, nan and why when the model's inputs allow no check.
    With several series each reason names its series."""
    unknown = not_checked(inputs)
    if unknown:
        return math.nan, unknown
    named = len(series) > 1
    said = [f"{name}: {reason}" if named else reason for name, figures in series
            for reason in outside(figures, inputs["seen"]).values()]
    return float(bool(said)), "; ".join(said)


def ood_table(index: pd.DataFrame, inputs: Mapping) -> pd.DataFrame:
    """Per series of an index: its figures, `ood` (1, 0, or nan when the model's inputs allow no check), `ood_reason`
    and `ood_figures` (the names of the figures outside, comma-separated). How often the flag fires on a source is
    the mean of `ood` over its series: evaluate.py writes it as data/ood_series_share, and any index (another site's,
    another scanner's) is measured the same way."""
    table = series_figures(index)
    unknown = not_checked(inputs)
    found = [{} if unknown else outside(row.dropna().to_dict(), inputs["seen"]) for _, row in table.iterrows()]
    table["ood"] = math.nan if unknown else [float(bool(reasons)) for reasons in found]
    table["ood_reason"] = [unknown or "; ".join(reasons.values()) for reasons in found]
    table["ood_figures"] = [",".join(reasons) for reasons in found]
    return table


def ood_summary(table: pd.DataFrame) -> str:
    """An ood_table in one line: `3 of 12 series outside the training ranges (slice_spacing_mm 3, head_hu_median 1)`,
    or why none could be checked."""
    if table.empty:
        return "no series with figures to compare (PNG/JPG folders have none)"
    if table["ood"].isna().all():
        return table["ood_reason"].iloc[0]
    counts = Counter(name for names in table["ood_figures"] for name in names.split(",") if name)
    by_figure = f" ({', '.join(f'{name} {count}' for name, count in counts.most_common())})" if counts else ""
    return f"{int(table['ood'].sum())} of {len(table)} series outside the training ranges{by_figure}"
