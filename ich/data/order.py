"""How the slices of one series are put in order, feet to head: the one rule that the index, nifti volumes,
stage 2 and prediction on a hospital folder share.

Slices sort by their position along the slice normal (ich.data.dicom.slice_position), by InstanceNumber where
positions are missing or do not tell the slices apart (files converted from volumes often all carry one
ImagePositionPatient), else by file name with its digits compared as numbers (`slice2` before `slice10`).
"""

import re
from collections.abc import Sequence

import numpy as np

# What a series' order rests on, best first (the index's `order` column).
ORDER_SOURCES = ("position", "instance", "file")
# Positions closer than this (mm) are the same place: projections of one position differ in their last bits.
SAME_PLACE_DECIMALS = 3


def natural_key(name: str) -> tuple:
    """Sort key that puts `slice2` before `slice10`: digit runs compare as numbers."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part)


def slice_order(positions: np.ndarray, instances: np.ndarray, names: Sequence[str]) -> tuple[np.ndarray, str]:
    """The order of one series' slices (indices into the arrays, feet to head) and what it rests on.

    A key that tells every slice apart wins, positions before InstanceNumbers; failing that, one present on every
    slice and not the same on all (a slice stored twice must not cost a series its positions); else the file
    names. Slices the chosen key does not tell apart follow their file names.
    """
    keys = (("position", np.round(np.asarray(positions, np.float64), SAME_PLACE_DECIMALS)),
            ("instance", np.asarray(instances, np.float64)))
    for distinct in (True, False):
        for source, key in keys:
            places = len(np.unique(key))
            if not np.isnan(key).any() and places >= (len(key) if distinct else min(2, len(key))):
                return _sorted(key, places, names), source
    return _sorted(np.zeros(len(names)), min(1, len(names)), names), "file"


def _sorted(key: np.ndarray, places: int, names: Sequence[str]) -> np.ndarray:
    if places == len(key):  # the common case: no name needs parsing
        return np.argsort(key, kind="stable")
    ranks = np.empty(len(names), np.int64)
    ranks[sorted(range(len(names)), key=lambda i: natural_key(str(names[i])))] = np.arange(len(names))
    return np.lexsort((ranks, key))
