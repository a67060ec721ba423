"""Train/val/test splits by patient, and the class balance of the training split.

Neighbouring slices of one patient are nearly identical, so a split by slice leaks; every split
here is by patient, stratified on whether the patient has any hemorrhage.
"""

import numpy as np
import pandas as pd

STAGES = ("train", "val", "test")


def split_by_patient(index: pd.DataFrame, fractions: tuple[float, float, float], seed: int) -> pd.Series:
    """Assign each slice the stage of its patient; returns a Series of stage names aligned with `index`."""
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"data.split={list(fractions)} must be three non-negative fractions (train, val, test) summing to 1.")
    positive = index.groupby("patient")["any"].max() if "any" in index else index.groupby("patient").size() * 0
    # Patients are shuffled from the order of their first image id, not of their pseudonyms: a pseudonym changes
    # with the installation's secret salt (ich.core.privacy), and the same seed must give the same split everywhere.
    first_image = index.groupby("patient")["image_id"].min()
    rng = np.random.default_rng(seed)
    stage_of: dict[str, str] = {}
    for _, patients in positive.groupby(positive):
        names = first_image.loc[patients.index].sort_values(kind="stable").index.to_numpy(copy=True)
        rng.shuffle(names)
        bounds = np.cumsum(_allocate(len(names), fractions))
        for stage, part in zip(STAGES, np.split(names, bounds[:2])):
            stage_of.update(dict.fromkeys(part, stage))
    stages = index["patient"].map(stage_of)
    counts = stages.value_counts()
    for stage, fraction in zip(STAGES, fractions):
        if fraction > 0 and counts.get(stage, 0) == 0:
            raise ValueError(
                f"data.split={list(fractions)} leaves the {stage} split empty with {positive.size} patients: "
                "use more patients or larger fractions."
            )
    return stages


def _allocate(n: int, fractions: tuple[float, ...]) -> np.ndarray:
    """Patients per stage: proportional, largest remainders first, and at least one per wanted stage
    when there are enough, so a small dataset still puts both classes into validation and test."""
    wanted = np.array(fractions) > 0
    counts = np.floor(np.array(fractions) * n).astype(int)
    if n >= wanted.sum():
        counts[wanted & (counts == 0)] = 1
    while counts.sum() > n:
        counts[np.argmax(counts)] -= 1
    remainders = np.array(fractions) * n - counts
    for stage in np.argsort(-remainders, kind="stable")[: n - counts.sum()]:
        counts[stage] += 1
    return counts


def undersample(table: pd.DataFrame, classes: np.ndarray, ratio: float, seed: int) -> pd.DataFrame:
    """Cap every class at `ratio` times the rarest class, drawing slices at random.

    `classes` holds each row's class. With ratio 1 the classes end up equal (the 50/50 samples
    of the papers); the rarest class keeps all its slices.
    """
    groups = pd.Series(np.arange(len(table))).groupby(np.asarray(classes))
    cap = int(round(ratio * groups.size().min()))
    rng = np.random.default_rng(seed)
    kept = np.concatenate([rng.permutation(rows.to_numpy())[:cap] for _, rows in groups])
    return table.iloc[np.sort(kept)]
