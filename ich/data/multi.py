"""Several sources in one run (`data=multi`): each source its own data configuration, read into one index.

A source is any data configuration (phantom, rsna, images, nifti) under a name of `data.sources`. Each source is
indexed and read as it would be alone; the run sees one table whose ids carry the source's name, so that two
hospitals' `ID_1` or two phantoms' patients never meet, and a `source` column that the splits, the balance of
training and the per-source metrics read.
"""

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

READERS = ("phantom", "rsna", "images", "nifti")  # what one source can be: the data configurations of conf/data
# Keys a source may set for itself: which slices these are, how their pixels become HU, and the inputs made of them
# (which must come out alike for every source). Everything else (split, batch size, augmentation) is the run's.
SOURCE_KEYS = ("source", "root", "image_dir", "labels", "phantom", "masks", "mask_labels", "min_mask_pixels",
               "label_columns", "first_slice", "patient_pattern", "encoding", "encoding_window", "hu_scale",
               "hu_offset", "hu_clip", "modalities", "cache", "windows", "context", "image_size")
# The run's keys a source inherits unless it sets them: what its own index and loader need (augment only tells its
# loader to keep HU in memory for the site augmentation, which the run applies).
SHARED_KEYS = ("cache_dir", "cache", "windows", "context", "image_size", "modalities", "augment")
# Columns that name a slice, a patient, a study or a series: prefixed by the source's name.
ID_COLUMNS = ("image_id", "patient", "study", "series")
SOURCE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
SEPARATOR = "/"


def source_configs(sources: Mapping[str, Mapping] | None, shared: Mapping) -> dict[str, dict]:
    """Each source's data module arguments: the run's `shared` keys, then the source's own on top."""
    if not sources:
        raise ValueError("data=multi reads the sources of data.sources, and it names none: give each one a name and "
                         "its data keys, e.g. data.sources={a: {source: phantom}, b: {source: rsna, root: DIR}}.")
    configs = {}
    for name, own in sources.items():
        if not SOURCE_NAME.match(str(name)):
            raise ValueError(f"data.sources.{name}: a source's name goes into metric names (test/<source>/auroc), so "
                             "use letters, digits, _ and - only.")
        own = dict(own or {})
        if own.get("source") not in READERS:
            raise ValueError(f"data.sources.{name}.source={own.get('source')}: say which reader indexes it "
                             f"({', '.join(READERS)}).")
        foreign = sorted(set(own) - set(SOURCE_KEYS))
        if foreign:
            raise ValueError(f"data.sources.{name}.{foreign[0]} is a key of the whole run, not of one source: set "
                             f"data.{foreign[0]} instead.")
        configs[str(name)] = {**{key: shared[key] for key in SHARED_KEYS if key in shared}, **own}
    return configs


def data_parts(data: Mapping) -> list[dict]:
    """The data configurations a run reads: each source of data=multi with the run's keys, or `data` itself."""
    if data.get("source") != "multi":
        return [dict(data)]
    return list(source_configs(data.get("sources"), data).values())


def check_same_inputs(made: Mapping[str, Mapping[str, object]], keys: Mapping[str, str]) -> None:
    """Refuse sources whose slices would become different inputs: one model reads them all.

    Args:
        made: source -> {what: value} (windows, context, image size, channels), in the order of data.sources.
        keys: what -> the key of a source's configuration that sets it (named in the refusal).
    """
    first, *others = made
    for name in others:
        for what, value in made[name].items():
            if value != made[first][what]:
                raise ValueError(f"data.sources.{name} makes {what} {value} and data.sources.{first} {what} "
                                 f"{made[first][what]}: one model reads every source, so set data.sources.{name}."
                                 f"{keys[what]} to match.")


def combine_indices(indices: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """One table of every source's slices, in the order of `indices` (each source's rows together, as its own index
    holds them), with a `source` column and ids prefixed `<source>/`."""
    parts = []
    for name, index in indices.items():
        prefixed = {column: name + SEPARATOR + index[column].astype(str) for column in ID_COLUMNS if column in index}
        parts.append(index.assign(**prefixed, source=name))
    return pd.concat(parts, ignore_index=True)


@dataclass(frozen=True)
class SourceLoaders:
    """Row of the combined index -> the planes its source's own loader makes of its row there.

    `starts` holds the first combined row of each source (the sources' indices follow each other), so a row finds
    its source with one binary search and no per-row Python object.
    """

    loaders: tuple
    starts: np.ndarray

    @property
    def channels(self) -> int:
        """Channels per slice that reach the model (the same for every source, checked at setup)."""
        return self.loaders[0].channels

    @property
    def windows(self):
        """The windows every source's planes are made with (the same, checked at setup), or None: images as read."""
        return self.loaders[0].windows

    def __call__(self, row: int) -> list[np.ndarray]:
        loader, own = self._source_row(row)
        return loader(own)

    def hu(self, row: int) -> np.ndarray:
        """The row's HU, for the site augmentation (ich.data.augment) to change before windowing."""
        loader, own = self._source_row(row)
        return loader.hu(own)

    def _source_row(self, row: int) -> tuple:
        part = int(np.searchsorted(self.starts, row, side="right")) - 1
        return self.loaders[part], row - int(self.starts[part])


def starts_of(lengths: Sequence[int]) -> np.ndarray:
    """The first row of each of consecutive blocks of `lengths` rows."""
    return np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
