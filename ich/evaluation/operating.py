"""Honest numbers: operating points, calibration and patient-level intervals (exams: ich.evaluation.exam).

A threshold of 0.5 is no operating point (class weights or undersampling move it anywhere), so one
threshold per output is chosen on the validation patients; test slices are then read at that threshold.
Test sets are small in patients, and a patient's slices are nearly alike, so intervals resample patients,
not slices. Everything here takes plain arrays, so training's test stage and evaluate.py share it.

Convention: a slice (or exam) is called positive when its probability is at least the threshold (`called`).
"""

import logging
from collections.abc import Callable, Mapping

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.stats import rankdata

from ich.core.tasks import Task

log = logging.getLogger(__name__)

OPERATING_POINTS = ("sensitivity", "youden")
# The output whose values the unsuffixed keys (`test/op_sensitivity`, `test/ece`) and exams report when a task has it.
HEADLINE_LABEL = "any"


DECISION_RULE = "called when probability >= threshold"


def called(probs: np.ndarray, thresholds: np.ndarray | float) -> np.ndarray:
    """Whether each probability is called positive: at or above its threshold. The one rule of every decision
    (operating points, plots, reports, prediction); torchmetrics' fixed-threshold metrics (`test/sensitivity` at
    task.threshold) count `>` instead, a family of their own that this rule leaves alone."""
    return np.asarray(probs) >= np.asarray(thresholds)


def headline_output(task: Task) -> int | None:
    """The output the unsuffixed keys and the exams report: `any`, or a binary task's one label; None for subtype."""
    if HEADLINE_LABEL in task.outputs:
        return task.outputs.index(HEADLINE_LABEL)
    return 0 if task.num_outputs == 1 else None


# --- one output: scores [N] and 0/1 truth [N] -----------------------------------------------------------


def sensitivity_specificity(scores: np.ndarray, truth: np.ndarray, threshold: float) -> tuple[float, float]:
    """Sensitivity and specificity with positives at scores >= threshold; NaN where a class is absent."""
    decided = called(scores, threshold)
    positive = truth.astype(bool)
    sensitivity = decided[positive].mean() if positive.any() else np.nan
    specificity = (~decided[~positive]).mean() if (~positive).any() else np.nan
    return float(sensitivity), float(specificity)


def threshold_for_sensitivity(scores: np.ndarray, truth: np.ndarray, target: float) -> float:
    """The highest threshold whose sensitivity reaches `target`: the most specific one that does.

    It is the score of the k-th most probable positive, k the fewest positives that make the target
    (target 0.8 of 5 positives: the 4th). NaN without positives.
    """
    positives = np.sort(scores[truth.astype(bool)])[::-1]
    if not len(positives):
        return float("nan")
    reached = np.arange(1, len(positives) + 1) / len(positives) >= target
    return float(positives[np.argmax(reached)])


def youden_threshold(scores: np.ndarray, truth: np.ndarray) -> float:
    """The threshold that maximises Youden's J = sensitivity + specificity - 1 (the highest one on a tie).

    Every distinct score is a candidate. NaN when a class is absent.
    """
    positive = truth.astype(bool)
    if positive.all() or not positive.any():
        return float("nan")
    candidates = np.unique(scores)[::-1]  # descending
    # positives (negatives) at or above each candidate, by counting sorted scores
    true_pos = positive.sum() - np.searchsorted(np.sort(scores[positive]), candidates, side="left")
    false_pos = (~positive).sum() - np.searchsorted(np.sort(scores[~positive]), candidates, side="left")
    youden = true_pos / positive.sum() - false_pos / (~positive).sum()
    return float(candidates[np.argmax(youden)])


def auroc(scores: np.ndarray, truth: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half), NaN when a class is absent."""
    positive = truth.astype(bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def macro_auroc(aurocs: list[float]) -> float:
    """The mean of the outputs' AUROCs where defined (`test/auroc`'s macro mean over outputs); NaN when none is."""
    return float("nan") if np.isnan(aurocs).all() else float(np.nanmean(aurocs))


def calibration_bins(probs: np.ndarray, truth: np.ndarray, bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Equal-mass bins of the predictions sorted by probability: mean probability, observed frequency and
    count per bin (fewer bins when there are fewer predictions). What a reliability diagram draws."""
    order = np.argsort(probs, kind="stable")
    groups = [group for group in np.array_split(order, min(bins, len(order))) if len(group)]
    mean_prob = np.array([probs[group].mean() for group in groups])
    frequency = np.array([truth[group].mean() for group in groups])
    return mean_prob, frequency, np.array([len(group) for group in groups])


def expected_calibration_error(probs: np.ndarray, truth: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error over equal-mass bins: sum over bins of (share of predictions) x
    |mean probability - observed frequency|. 0 for a calibrated model."""
    mean_prob, frequency, counts = calibration_bins(probs, truth, bins)
    return float(np.sum(counts / counts.sum() * np.abs(mean_prob - frequency)))


# --- several outputs ----------------------------------------------------------------------------------


def probabilities(task: Task, logits: torch.Tensor, temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Softmax over the outputs for a cross-entropy task, an independent sigmoid per output otherwise, of the
    logits divided by the temperature (1: as trained)."""
    scaled = logits / temperature
    return scaled.softmax(dim=-1) if task.loss == "ce" else scaled.sigmoid()


def one_vs_rest(task: Task, targets: np.ndarray) -> np.ndarray:
    """0/1 truth [N, K] per output: subtype's class indices one-hot, sigmoid tasks' targets as they are."""
    if task.loss == "ce":
        return np.eye(task.num_outputs, dtype=np.int64)[targets]
    return targets.reshape(len(targets), -1).astype(np.int64)


def choose_thresholds(
    probs: np.ndarray, truth: np.ndarray, method: str, target_sensitivity: float, fallback: float
) -> np.ndarray:
    """One threshold per output [K] from validation probabilities and 0/1 truth [N, K].

    Args:
        method: `sensitivity` (the highest threshold reaching `target_sensitivity`) or `youden`.
        fallback: the threshold of an output whose validation split lacks a class (no operating point there).
    """
    if method not in OPERATING_POINTS:
        raise ValueError(f"Unknown task.operating_point={method}: choose one of {', '.join(OPERATING_POINTS)}.")
    chosen = []
    for k in range(probs.shape[1]):
        if method == "sensitivity":
            threshold = threshold_for_sensitivity(probs[:, k], truth[:, k], target_sensitivity)
        else:
            threshold = youden_threshold(probs[:, k], truth[:, k])
        if np.isnan(threshold):
            log.warning("Output %d has one class only on the validation slices: no operating point, threshold %g",
                        k, fallback)
            threshold = fallback
        chosen.append(threshold)
    return np.array(chosen, dtype=np.float32)


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, loss: str) -> float:
    """The temperature T that minimises the negative log likelihood of logits / T on validation (LBFGS on log T).

    Args:
        logits: [N, K] float; targets: [N, K] 0/1 for `loss="bce"`, class indices [N] for `loss="ce"`.
    """
    logits = logits.detach().double()
    targets = targets.double() if loss == "bce" else targets.long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-15,
                                  line_search_fn="strong_wolfe")

    def nll() -> torch.Tensor:
        optimizer.zero_grad()
        scaled = logits / log_t.exp()
        value = F.binary_cross_entropy_with_logits(scaled, targets) if loss == "bce" else F.cross_entropy(scaled, targets)
        value.backward()
        return value

    optimizer.step(nll)
    return float(log_t.detach().exp())


def patient_bootstrap(
    statistic: Callable[[np.ndarray], np.ndarray],
    patients: np.ndarray,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of `statistic` over resamples of whole patients, drawn with replacement.

    Args:
        statistic: row indices (a patient drawn twice gives its rows twice) -> a vector of values; NaN where
            a resample leaves a value undefined (no positives), which the percentiles skip.
        patients: the patient of each row.
    Returns:
        (low, high): the (1 - level) / 2 and (1 + level) / 2 percentiles of each value.
    """
    _, patient_of = np.unique(patients, return_inverse=True)
    order = np.argsort(patient_of, kind="stable")
    rows_of = np.split(order, np.flatnonzero(np.diff(patient_of[order])) + 1)
    rng = np.random.default_rng(seed)
    values = np.array([
        statistic(np.concatenate([rows_of[p] for p in rng.integers(0, len(rows_of), len(rows_of))]))
        for _ in range(resamples)
    ], dtype=np.float64).reshape(resamples, -1)
    low = np.full(values.shape[1], np.nan)
    high = np.full(values.shape[1], np.nan)
    defined = ~np.isnan(values).all(axis=0)
    tail = (1 - level) / 2 * 100
    low[defined] = np.nanpercentile(values[:, defined], tail, axis=0)
    high[defined] = np.nanpercentile(values[:, defined], 100 - tail, axis=0)
    return low, high


# --- the test report ----------------------------------------------------------------------------------


def slice_groups(table: pd.DataFrame, image_ids: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
    """The patient and the study of each slice id, from a data module's stage table; studies are None for a
    source that has none (PNG/JPG slices)."""
    rows = table.set_index("image_id").loc[list(image_ids)]
    studies = rows["study"].to_numpy() if "study" in rows else None
    return rows["patient"].to_numpy(), studies


def honest_metrics(
    task: Task,
    logits: torch.Tensor,
    targets: torch.Tensor,
    thresholds: np.ndarray,
    temperature: float,
    patients: np.ndarray,
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """The test metrics beyond threshold 0.5, with the keys of metrics.json, for training's test stage and
    evaluate.py alike.

    Per output, at its operating point: `op_threshold`, `op_sensitivity`, `op_specificity` with their patient
    bootstrap intervals (`_ci_low`, `_ci_high`), and `ece` (`ece_uncalibrated` too when the temperature is not 1);
    `auroc_ci_low`/`auroc_ci_high` around `test/auroc` (the macro mean over outputs). Keys of one output end in
    `_<label>` when the task has several; the unsuffixed keys are the binary output's or `any`'s (the exam level is
    ich.evaluation.exam.exam_metrics'). `data/patients_test` counts the patients the intervals stand on.

    Args:
        logits: [N, K] test logits; targets: as the task's loss takes them.
        thresholds: [K] the model's operating thresholds; temperature: the model's (applied to the logits).
        patients: per slice.
        resamples, seed: of the patient bootstrap.
    """
    probs = probabilities(task, logits.float(), temperature).numpy()
    truth = one_vs_rest(task, targets.numpy())
    count = task.num_outputs
    headline = headline_output(task)
    metrics: dict[str, float] = {}

    def put(name: str, k: int, value: float) -> None:
        if count > 1:
            metrics[f"test/{name}_{task.outputs[k]}"] = float(value)
        if k == headline:
            metrics[f"test/{name}"] = float(value)

    uncalibrated = probabilities(task, logits.float()).numpy() if temperature != 1 else None
    for k in range(count):
        sensitivity, specificity = sensitivity_specificity(probs[:, k], truth[:, k], thresholds[k])
        put("op_threshold", k, thresholds[k])
        put("op_sensitivity", k, sensitivity)
        put("op_specificity", k, specificity)
        put("ece", k, expected_calibration_error(probs[:, k], truth[:, k]))
        if uncalibrated is not None:
            put("ece_uncalibrated", k, expected_calibration_error(uncalibrated[:, k], truth[:, k]))

    def statistic(rows: np.ndarray) -> np.ndarray:
        aurocs = [auroc(probs[rows, k], truth[rows, k]) for k in range(count)]
        points = [sensitivity_specificity(probs[rows, k], truth[rows, k], thresholds[k]) for k in range(count)]
        return np.array([macro_auroc(aurocs), *aurocs, *(s for s, _ in points), *(s for _, s in points)])

    low, high = patient_bootstrap(statistic, patients, resamples, seed)
    metrics["test/auroc_ci_low"], metrics["test/auroc_ci_high"] = float(low[0]), float(high[0])
    for k in range(count):
        if count > 1:
            metrics[f"test/auroc_ci_low_{task.outputs[k]}"] = float(low[1 + k])
            metrics[f"test/auroc_ci_high_{task.outputs[k]}"] = float(high[1 + k])
        for j, name in enumerate(("op_sensitivity", "op_specificity")):
            put(f"{name}_ci_low", k, low[1 + (j + 1) * count + k])
            put(f"{name}_ci_high", k, high[1 + (j + 1) * count + k])
    metrics["data/patients_test"] = float(len(np.unique(patients)))
    return metrics


# --- several sources (data=multi) ---------------------------------------------------------------------

# What each source of a several-source test split reports, beside the pooled values (with their intervals).
SOURCE_METRICS = ("auroc", "op_sensitivity", "op_specificity")


def source_metrics(
    task: Task,
    logits: torch.Tensor,
    targets: torch.Tensor,
    thresholds: np.ndarray,
    temperature: float,
    table: pd.DataFrame,
    image_ids: list[str],
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """`test/<source>/auroc`, `op_sensitivity` and `op_specificity` with their patient-bootstrap intervals
    (`_ci_low`, `_ci_high`) and `data/<source>/patients_test`, per source of a stage table with a `source` column
    (data=multi): the same figures as the pooled ones (honest_metrics), on each source's slices alone, at the
    model's one operating point. Nothing for a table of one source without that column.
    """
    if "source" not in table:
        return {}
    rows = table.set_index("image_id").loc[list(image_ids)]
    sources, patients = rows["source"].to_numpy(), rows["patient"].to_numpy()
    probs = probabilities(task, logits.float(), temperature).numpy()
    truth = one_vs_rest(task, targets.numpy())
    wanted = [f"test/{name}{tail}" for name in SOURCE_METRICS for tail in ("", "_ci_low", "_ci_high")]
    metrics: dict[str, float] = {}
    for name in dict.fromkeys(sources):
        mine = sources == name
        honest = honest_metrics(task, logits[mine], targets[mine], thresholds, temperature, patients[mine],
                                resamples, seed)
        honest["test/auroc"] = macro_auroc([auroc(probs[mine, k], truth[mine, k]) for k in range(task.num_outputs)])
        metrics.update({key.replace("test/", f"test/{name}/", 1): honest[key] for key in wanted if key in honest})
        metrics[f"data/{name}/patients_test"] = honest["data/patients_test"]
    return metrics


def metric_sources(metrics: Mapping[str, float | None]) -> list[str]:
    """The sources that metrics.json reports on their own (`test/<source>/auroc`), in its order."""
    return [key.split("/")[1] for key in metrics if key.count("/") == 2 and key.startswith("test/")
            and key.endswith("/auroc")]


def below_pooled(metrics: Mapping[str, float | None], source: str) -> bool:
    """Whether a source's AUROC interval lies wholly below the pooled one's: the model is worse there than on the
    sources together by more than chance explains (a site it does not carry to). False where an interval is missing."""
    high, low = metrics.get(f"test/{source}/auroc_ci_high"), metrics.get("test/auroc_ci_low")
    return high is not None and low is not None and high < low
