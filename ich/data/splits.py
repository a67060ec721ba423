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


def split_by_source(index: pd.DataFrame, fractions: tuple[float, float, float], seed: int,
                    held_out: tuple[str, ...] = ()) -> pd.Series:
    """Stages of a several-source index (a `source` column): each source split by patient on its own, so every
    source reaches every stage in its own proportions; a source of `held_out` goes to the test split whole
    (leave-one-source-out), and the others then share train and validation in data.split's train:val ratio."""
    names = list(dict.fromkeys(index["source"]))
    unknown = [name for name in held_out if name not in names]
    if unknown:
        raise ValueError(f"data.test_sources names {unknown[0]}, which is not a source of data.sources: name one of "
                         f"{', '.join(names)}.")
    if held_out and set(names) <= set(held_out):
        raise ValueError(f"data.test_sources={list(held_out)} holds out every source, leaving none to train on: "
                         "leave at least one out of it.")
    train, val, _ = (float(f) for f in fractions)
    if held_out and not train + val > 0:
        raise ValueError(f"data.split={list(fractions)} leaves nothing to train on beside data.test_sources: give "
                         "train (and validation) a fraction.")
    rest = (train / (train + val), val / (train + val), 0.0) if held_out else tuple(fractions)
    stages = pd.Series(index=index.index, dtype=object)
    for name, part in index.groupby("source", sort=False):
        stages[part.index] = "test" if name in held_out else split_by_patient(part, rest, seed)
    return stages


def equal_sources(table: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Every source as many training slices as the largest: the slices of a smaller one are repeated whole, and the
    remainder drawn at random, so an epoch samples the sources equally (each repeat is augmented afresh)."""
    groups = pd.Series(np.arange(len(table))).groupby(table["source"].to_numpy(), sort=False)
    largest = int(groups.size().max())
    rng = np.random.default_rng(seed)
    rows = []
    for _, members in groups:
        members = members.to_numpy()
        copies, remainder = divmod(largest, len(members))
        rows.append(np.concatenate([np.tile(members, copies), rng.permutation(members)[:remainder]]))
    return table.iloc[np.sort(np.concatenate(rows), kind="stable")]
