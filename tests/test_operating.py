"""Operating points, calibration, patient bootstrap and exam level (ich.evaluation.operating), against hand-computed values."""

import logging
import math

import numpy as np
import pytest
import torch

from ich.core.tasks import LABELS, get_task
from ich.evaluation.exam import exam_metrics, exams_of
from ich.evaluation.operating import (auroc, calibration_bins, choose_thresholds, expected_calibration_error,
                                      fit_temperature, honest_metrics, patient_bootstrap, sensitivity_specificity,
                                      threshold_for_sensitivity, youden_threshold)

# Five positives and four negatives; by hand: at 0.6, 4 of 5 positives and 3 of 4 negatives (0.65 is above).
SCORES = np.array([0.9, 0.8, 0.7, 0.6, 0.2, 0.1, 0.3, 0.5, 0.65])
TRUTH = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0])


def test_a_slice_at_the_threshold_counts_as_positive():
    assert sensitivity_specificity(SCORES, TRUTH, 0.6) == (0.8, 0.75)
    assert sensitivity_specificity(SCORES, TRUTH, 0.2) == (1.0, 0.25)


@pytest.mark.parametrize("target, threshold, sensitivity, specificity", [
    (0.8, 0.6, 0.8, 0.75),    # 4 of 5 positives: the 4th most probable positive
    (0.95, 0.2, 1.0, 0.25),   # 4.75 of 5: all five
    (0.5, 0.7, 0.6, 1.0),     # 2.5 of 5: three
])
def test_the_chosen_threshold_is_the_most_specific_one_that_reaches_the_target(target, threshold, sensitivity,
                                                                                specificity):
    chosen = threshold_for_sensitivity(SCORES, TRUTH, target)
    assert chosen == threshold
    assert sensitivity_specificity(SCORES, TRUTH, chosen) == (sensitivity, specificity)


def test_a_target_of_exactly_k_positives_is_reached_with_k():
    """0.28 x 25 is 7.000000000000001 in floating point, which must not ask for an 8th positive."""
    scores = np.arange(1, 26) / 25
    assert threshold_for_sensitivity(scores, np.ones(25), 0.28) == 19 / 25  # the 7th highest of 1/25 ... 25/25


def test_youden_picks_the_threshold_of_the_largest_sensitivity_plus_specificity():
    scores = np.array([0.9, 0.8, 0.6, 0.45, 0.1, 0.2, 0.5, 0.3, 0.55])
    truth = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0])
    # at 0.6: 3/4 + 5/5 - 1 = 0.75; at 0.45: 4/4 + 3/5 - 1 = 0.6; at 0.8: 2/4 + 1 - 1 = 0.5
    assert youden_threshold(scores, truth) == 0.6


def test_an_output_without_validation_positives_keeps_the_fallback_threshold(caplog):
    probs = np.array([[0.9, 0.2], [0.3, 0.4], [0.7, 0.1]])
    truth = np.array([[1, 0], [0, 0], [1, 0]])
    with caplog.at_level(logging.WARNING, logger="ich.evaluation.operating"):
        thresholds = choose_thresholds(probs, truth, "sensitivity", 0.95, fallback=0.5)
    assert thresholds.tolist() == pytest.approx([0.7, 0.5])
    assert "Output 1 has one class only" in caplog.text
    with pytest.raises(ValueError, match="task.operating_point=best: choose one of sensitivity, youden"):
        choose_thresholds(probs, truth, "best", 0.95, fallback=0.5)


def test_auroc_counts_ties_half_and_is_undefined_with_one_class():
    # pairs (positive, negative): 0.8>0.4, 0.8>0.2, 0.4=0.4 (half), 0.4>0.2: 3.5 of 4
    assert auroc(np.array([0.8, 0.4, 0.4, 0.2]), np.array([1, 1, 0, 0])) == 0.875
    assert math.isnan(auroc(np.array([0.8, 0.4]), np.array([1, 1])))


def test_ece_weighs_each_equal_mass_bin_by_its_share():
    probs, truth = np.array([0.1, 0.2, 0.3, 0.4]), np.array([0, 0, 1, 1])
    mean_prob, frequency, counts = calibration_bins(probs, truth, bins=2)
    assert mean_prob.tolist() == pytest.approx([0.15, 0.35]) and frequency.tolist() == [0, 1] and counts.tolist() == [2, 2]
    assert expected_calibration_error(probs, truth, bins=2) == pytest.approx(0.5 * 0.15 + 0.5 * 0.65)
    # 0.25 everywhere and one positive in each bin of four: perfectly calibrated
    assert expected_calibration_error(np.full(8, 0.25), np.array([0, 1, 0, 0, 0, 0, 1, 0]), bins=2) == 0.0


def test_equal_mass_bins_hold_as_many_predictions_each():
    probs = np.array([0.01, 0.02, 0.03, 0.05, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99])
    assert calibration_bins(probs, np.zeros(10), bins=5)[2].tolist() == [2, 2, 2, 2, 2]
    assert len(calibration_bins(probs[:3], np.zeros(3), bins=10)[2]) == 3  # never an empty bin


def test_temperature_makes_sigmoid_probabilities_match_the_observed_frequency():
    # logit 4 with 3 positives in 4, logit -4 with 1 in 4: sigmoid(4 / T) = 3/4, so T = 4 / ln 3
    logits = torch.tensor([4.0] * 4 + [-4.0] * 4)[:, None]
    targets = torch.tensor([1.0, 1, 1, 0, 0, 0, 0, 1])[:, None]
    assert fit_temperature(logits, targets, "bce") == pytest.approx(4 / math.log(3), rel=1e-6)


def test_temperature_of_a_softmax_task():
    # logits (2, 0) with class 0 in 3 of 4: softmax gives sigmoid(2 / T) = 3/4, so T = 2 / ln 3
    logits = torch.tensor([[2.0, 0.0]] * 4)
    assert fit_temperature(logits, torch.tensor([0, 0, 0, 1]), "ce") == pytest.approx(2 / math.log(3), rel=1e-6)


def test_an_exam_is_positive_when_any_slice_is_and_scores_its_highest_slice():
    scores = np.array([0.1, 0.3, 0.7, 0.4, 0.2])
    truth = np.array([0, 0, 1, 0, 0])
    exams = np.array(["A", "B", "A", "B", "A"])
    found = exams_of(scores[:, None], truth[:, None], exams, np.array(["p"] * 5))
    assert found.probs[:, 0].tolist() == [0.7, 0.4] and found.truth[:, 0].tolist() == [1, 0]


# --- patient bootstrap --------------------------------------------------------------------------------


def clustered(patients: int, slices: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores, truth and patient ids: half of the patients positive, a patient's slices alike."""
    rng = np.random.default_rng(seed)
    positive = np.arange(patients) % 2
    level = positive + rng.normal(0, 0.8, patients)  # per patient
    scores = np.repeat(level, slices) + rng.normal(0, 0.2, patients * slices)
    return scores, np.repeat(positive, slices), np.repeat(np.arange(patients), slices)


def test_interval_contains_the_point_estimate_and_shrinks_with_more_patients():
    widths = []
    for patients in (10, 40, 160):
        scores, truth, ids = clustered(patients, slices=8)
        low, high = patient_bootstrap(lambda rows: auroc(scores[rows], truth[rows]), ids, resamples=500, seed=1)
        assert low[0] <= auroc(scores, truth) <= high[0]
        widths.append(high[0] - low[0])
    assert widths[0] > widths[1] > widths[2]


def test_resampling_draws_whole_patients():
    """Four patients of 100 identical slices each, two of them at 1: the mean of a resample of four patients
    is k/4 with k ~ Binomial(4, 1/2), so 0 and 1 each have probability 1/16 > 2.5% and the interval is [0, 1].
    Resampling the 400 slices instead would give about 0.5 +- 0.05."""
    values = np.repeat([0.0, 0.0, 1.0, 1.0], 100)
    patients = np.repeat(["p1", "p2", "p3", "p4"], 100)
    low, high = patient_bootstrap(lambda rows: values[rows].mean(), patients, resamples=1000, seed=0)
    assert (low[0], high[0]) == (0.0, 1.0)


def test_each_resample_is_a_union_of_whole_patients_with_as_many_patients_as_the_data():
    patients = np.array(["b", "a", "b", "c", "a", "b"])  # rows of a patient need not be adjacent
    rows_of = {p: sorted(np.flatnonzero(patients == p)) for p in "abc"}
    seen = []

    def record(rows: np.ndarray) -> float:
        seen.append(rows)
        return 0.0

    patient_bootstrap(record, patients, resamples=50, seed=3)
    for rows in seen:
        drawn = [p for p in patients[rows]]
        counts = {p: drawn.count(p) // len(rows_of[p]) for p in set(drawn)}
        assert sum(counts.values()) == 3  # three patients drawn, with replacement
        for p, times in counts.items():
            assert sorted(r for r in rows if patients[r] == p) == sorted(rows_of[p] * times)


def test_the_same_seed_gives_the_same_interval():
    scores, truth, ids = clustered(12, slices=4)

    def statistic(rows):
        return auroc(scores[rows], truth[rows])

    first = patient_bootstrap(statistic, ids, resamples=200, seed=5)
    assert np.array_equal(first, patient_bootstrap(statistic, ids, resamples=200, seed=5))
    assert not np.array_equal(first, patient_bootstrap(statistic, ids, resamples=200, seed=6))


# --- the keys of metrics.json ---------------------------------------------------------------------------


def logits_of(probs: list[float]) -> torch.Tensor:
    p = torch.tensor(probs, dtype=torch.float64)
    return (p / (1 - p)).log().float()[:, None]


def test_binary_report_at_the_operating_point_with_exams_by_study():
    """Two patients, one study each. At threshold 0.5: positives 0.9, 0.6 called, 0.3 missed (2/3);
    negatives 0.2, 0.4 right, 0.55 wrong (2/3). Exams: A (0.9, max truth 1) and B (0.55, truth 0)."""
    probs = [0.9, 0.6, 0.3, 0.2, 0.4, 0.55]
    targets = torch.tensor([1.0, 1, 1, 0, 0, 0])[:, None]
    patients = np.array(["p1", "p1", "p1", "p2", "p2", "p2"])
    studies = np.array(["A", "A", "A", "B", "B", "B"])
    metrics = honest_metrics(get_task("binary"), logits_of(probs), targets, np.array([0.5]), 1.0, patients,
                             resamples=100, seed=0)
    metrics.update(exam_metrics(exams_of(np.array(probs)[:, None], targets.numpy(), studies, patients), 0, 0.5))
    assert metrics["test/op_threshold"] == 0.5
    assert metrics["test/op_sensitivity"] == pytest.approx(2 / 3)
    assert metrics["test/op_specificity"] == pytest.approx(2 / 3)
    assert metrics["test/exam_op_sensitivity"] == 1.0 and metrics["test/exam_op_specificity"] == 0.0
    assert metrics["test/exam_auroc"] == 1.0 and metrics["data/exams_test"] == 2
    # every resample is p1 twice (no negatives), p2 twice (no positives) or both, whose AUROC is 7/9 (0.9 and 0.6
    # above the three negatives, 0.3 above 0.2)
    assert metrics["test/auroc_ci_low"] == metrics["test/auroc_ci_high"] == pytest.approx(7 / 9)
    assert not any(name.endswith("_any") for name in metrics)
    assert "test/ece_uncalibrated" not in metrics  # temperature 1: nothing was calibrated


def test_six_labels_report_any_unsuffixed_and_every_label_suffixed():
    rng = np.random.default_rng(0)
    targets = torch.as_tensor(rng.integers(0, 2, (40, 6)), dtype=torch.float32)
    logits = torch.as_tensor(rng.normal(0, 1, (40, 6)), dtype=torch.float32) + 2 * targets - 1
    patients = np.repeat(np.arange(10), 4)
    metrics = honest_metrics(get_task("multilabel"), logits, targets, np.full(6, 0.5, np.float32), 2.0, patients,
                             resamples=50, seed=0)
    for name in ("op_threshold", "op_sensitivity", "op_specificity", "ece", "ece_uncalibrated",
                 "op_sensitivity_ci_low", "op_sensitivity_ci_high", "op_specificity_ci_low", "op_specificity_ci_high"):
        assert metrics[f"test/{name}"] == metrics[f"test/{name}_any"], name
        assert all(f"test/{name}_{label}" in metrics for label in LABELS), name
    assert all(f"test/auroc_ci_low_{label}" in metrics for label in LABELS)
    # temperature 2 halves the logits: another ECE than the model's own
    assert metrics["test/ece"] != metrics["test/ece_uncalibrated"]


def test_a_probability_exactly_at_its_threshold_is_called_in_plots_classical_scores_and_verdicts(monkeypatch, tmp_path):
    import ich.evaluation.plots
    from ich.classical.classifiers import score
    from ich.inference.answer import verdict

    threshold = 0.25  # exact in float32 and float64: the probability equals it bit for bit
    panels = []
    monkeypatch.setattr(ich.evaluation.plots, "save_confusion_matrices", lambda path, shown: panels.extend(shown))
    monkeypatch.setattr(ich.evaluation.plots, "save_roc_curves", lambda *args: None)
    binary = get_task("binary")
    ich.evaluation.plots.save_figures(tmp_path, binary, threshold, torch.tensor([[0.25], [0.1]]), torch.tensor([[1], [0]]))
    (_, counts, _), = panels
    assert np.asarray(counts).tolist() == [[1, 0], [0, 1]]  # rows truth no/yes, columns called no/yes

    assert score(binary, "acc", threshold, np.array([[0.25], [0.1]]), np.array([1, 0])) == 1.0

    text, positive = verdict(LABELS, "multilabel", np.full(6, threshold), np.full(6, threshold))
    assert positive and text.startswith("hemorrhage")
