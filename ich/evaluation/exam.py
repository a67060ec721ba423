"""What an exam is and how its score is made: the one definition the test stage, evaluate.py, stage 2 and
predict.py share.

An exam is a study, read on the series that ich.inference.study chooses for it in predict.py (several when a split protocol
needs them to cover the head), and on its labelled series in the test stage and evaluate.py. A series' exam
probability per output is its highest probability over the slices training would have tested (those with at
least data.min_brain_fraction of brain) for a slice model, or the sequence model's exam output for stage 2; the
exam's is the highest over the series it is read on. The exam is positive when any of its slices is, and it is
called at its output's exam threshold (`p >= threshold`): a slice model's slice thresholds, a sequence model's own
exam thresholds (chosen on the validation exams).
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from ich.core.privacy import pseudonym
from ich.core.tasks import Task
from ich.evaluation.operating import (auroc, called, headline_output, patient_bootstrap, sensitivity_specificity,
                                      slice_groups)

log = logging.getLogger(__name__)


def series_exam_probabilities(slice_probs: np.ndarray) -> np.ndarray:
    """A slice model's exam probability per output [K] for one series: the highest of its slices [N, K]."""
    return np.asarray(slice_probs).max(axis=0)


def combine_series(series_exams: list[np.ndarray]) -> np.ndarray:
    """The exam probability per output [K] of a study read on several series: the highest of theirs."""
    return np.max(np.stack(series_exams), axis=0)


@dataclass(frozen=True)
class Exams:
    """The exams of a set of patients, one row each in sorted order of the study keys."""

    study: np.ndarray  # [E] study keys: pseudonyms of the StudyInstanceUID (ich.data.index, ich.inference.study)
    patient: np.ndarray  # [E] the patient of each study
    probs: np.ndarray  # [E, K] exam probability per output
    truth: np.ndarray  # [E, K] 0/1: positive when any of the exam's slices is


def exams_of(probs: np.ndarray, truth: np.ndarray, studies: np.ndarray, patients: np.ndarray) -> Exams:
    """The exams of rows that each score a part of one: a slice model's slices, or a sequence model's series.

    Args:
        probs, truth: [N, K] per row, the probabilities and 0/1 truth of each output.
        studies, patients: [N] the study and the patient of each row.
    """
    names, first, exam_of = np.unique(studies, return_index=True, return_inverse=True)
    best = np.full((len(names), probs.shape[1]), -np.inf)
    positive = np.zeros((len(names), truth.shape[1]), np.int64)
    np.maximum.at(best, exam_of, probs)
    np.maximum.at(positive, exam_of, truth.astype(np.int64))
    return Exams(study=names, patient=np.asarray(patients)[first], probs=best, truth=positive)


def exam_table(exams: Exams, labels: tuple[str, ...], thresholds: np.ndarray, keyed: bool = True) -> pd.DataFrame:
    """exams.csv: per exam its study and patient pseudonyms, and per output its truth, probability and whether it
    is called at the exam threshold. `keyed=False`: the study names are ids of a truth CSV, pseudonymised here."""
    study = exams.study if keyed else [pseudonym(str(name)) for name in exams.study]
    table = pd.DataFrame({"study": study, "patient": exams.patient})
    for k, label in enumerate(labels):
        table[f"truth_{label}"] = exams.truth[:, k]
        table[f"prob_{label}"] = exams.probs[:, k]
        table[f"called_{label}"] = called(exams.probs[:, k], thresholds[k]).astype(int)
    return table


def exam_metrics(exams: Exams, output: int, threshold: float, resamples: int = 1000,
                 seed: int = 0) -> dict[str, float]:
    """`test/exam_auroc`, `test/exam_op_threshold`, `test/exam_op_sensitivity` and `test/exam_op_specificity` of
    one output, with 95% intervals (`_ci_low`, `_ci_high`) over resamples of whole patients: a patient's studies
    move together, as slices do in every other interval. `data/exams_test` counts the exams."""
    scores, positive = exams.probs[:, output], exams.truth[:, output]

    def statistic(rows: np.ndarray) -> np.ndarray:
        return np.array([auroc(scores[rows], positive[rows]),
                         *sensitivity_specificity(scores[rows], positive[rows], threshold)])

    values = statistic(np.arange(len(scores)))
    low, high = patient_bootstrap(statistic, exams.patient, resamples, seed)
    metrics = {"test/exam_op_threshold": float(threshold), "data/exams_test": float(len(scores))}
    for j, name in enumerate(("exam_auroc", "exam_op_sensitivity", "exam_op_specificity")):
        metrics.update({f"test/{name}": float(values[j]), f"test/{name}_ci_low": float(low[j]),
                        f"test/{name}_ci_high": float(high[j])})
    return metrics


def stage_exams(model: pl.LightningModule, trainer: pl.Trainer, loader: DataLoader, table: pd.DataFrame,
                ids: list[str], logits: torch.Tensor, targets: torch.Tensor) -> Exams | None:
    """The exams of a stage (test or validation) from its slice predictions `ids`, `logits` [N, K], `targets`,
    scored as `model`, an ich.training.module.SliceClassifier, scores them (its exam_rows: its slices, or its series; taken
    by that method, not imported, so that exams sit below the LightningModules); `table` is the stage's
    slice table. None for a source without studies (PNG/JPG slices) or a model without exams (stage-2 subtype)."""
    rows = model.exam_rows(trainer, loader, ids, logits, targets)
    if rows is None:
        return None
    row_ids, probs, truth = rows
    patients, studies = slice_groups(table, row_ids)
    return None if studies is None else exams_of(probs, truth, studies, patients)


def report_exams(task: Task, exams: Exams | None, thresholds: np.ndarray, output_dir: Path, resamples: int,
                 seed: int) -> dict[str, float]:
    """exams.csv in `output_dir`, and the exam metrics of the headline output (ich.evaluation.operating.headline_output)."""
    if exams is None:
        log.info("No exams: this data has no studies (PNG/JPG slices without a series column) or the model no exam "
                 "output (stage-2 subtype)")
        return {}
    exam_table(exams, task.outputs, thresholds).to_csv(output_dir / "exams.csv", index=False, float_format="%.9g")
    output = headline_output(task)
    if output is None:
        log.info("No exam-level metrics for task=%s: exams are read on the `any` output or a binary one", task.name)
        return {}
    return exam_metrics(exams, output, float(thresholds[output]), resamples, seed)
