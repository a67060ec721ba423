"""What an exam is and how its score is made: the one definition the test stage, evaluate.py, stage 2 and
predict.py share.

An exam is a study, read on the series that ich.study chooses for it (several when a split protocol needs them
to cover the head). A series' exam probability per output is its highest slice probability for a slice model, or
the sequence model's exam output for stage 2; the exam's is the highest over the series it is read on. The exam is
positive when any of its slices is, and it is called at its output's threshold (`p >= threshold`).
"""

import numpy as np


def series_exam_probabilities(slice_probs: np.ndarray) -> np.ndarray:
    """A slice model's exam probability per output [K] for one series: the highest of its slices [N, K]."""
    return np.asarray(slice_probs).max(axis=0)


def combine_series(series_exams: list[np.ndarray]) -> np.ndarray:
    """The exam probability per output [K] of a study read on several series: the highest of theirs."""
    return np.max(np.stack(series_exams), axis=0)


def exam_scores(scores: np.ndarray, truth: np.ndarray, exams: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One score and one 0/1 truth per exam (in sorted order of the exam ids), from one output's slice scores and
    truth [N] and each slice's exam [N]: an exam is positive when any of its slices is, and its score is its
    highest slice probability."""
    _, exam_of = np.unique(exams, return_inverse=True)
    best = np.full(exam_of.max() + 1, -np.inf)
    positive = np.zeros(exam_of.max() + 1)
    np.maximum.at(best, exam_of, scores)
    np.maximum.at(positive, exam_of, truth)
    return best, positive
