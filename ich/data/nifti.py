"""NIfTI volumes (PhysioNet CT-ICH, BHSD, INSTANCE, HemSeg-200) as series of the one slice index.

Each volume is read once, when the index is built. Its affine, not its storage order, turns it to the
closest canonical orientation (nibabel's RAS+), so that its slices are axial, run inferior to superior like
a DICOM series sorted by position, and look as a DICOM viewer shows them (the patient's right on the image's
left, anterior at the top). Each slice is clipped to the HU range of the DICOM reader and unpacked into a .npy
of int16 HU in the index's folder. From there on a slice is a file like a DICOM slice: the loaders, the
slice cache, the in-memory copy and the report read it through `read_hu_square`, and splits, context,
evaluation and external validation are the DICOM path itself. Why unpack: a .nii.gz cannot be read a slice
at a time, so a loader reading slices in random order would decompress a whole volume for every slice.

Slice labels come from a CSV or from masks. The CSV has a volume column (the file name without .nii or
.nii.gz; a number matches a zero-padded name, so CT-ICH's 49 is 049.nii), a slice column (the number of the
slice along the stored axis that the affine makes axial, the first one numbered `first_slice`) and label
columns. Masks have the volumes' file names and shapes: a slice shows `any` when more than `min_mask_pixels`
of its mask voxels are non-zero, and a subtype when more than that many carry a value `mask_labels` maps to it.
"""

import json
import logging
import math
import os
import re
import shutil
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ich.core.privacy import pseudonym
from ich.core.tasks import LABELS, SUBTYPES
from ich.data.dicom import AIR_HU, MAX_HU, UNPACKED_SUFFIX, error_line, field_of_view
from ich.data.index import IndexSummary, add_slice_order, brain_fraction, cached_index, head_figures, index_dir
from ich.data.sources import check_unique_ids

log = logging.getLogger(__name__)

VOLUME_SUFFIXES = (".nii.gz", ".nii")
ROLES = ("volume", "slice", *LABELS)  # what a column of the label CSV can hold


def volume_name(path: str | Path) -> str | None:
    """The file name of a volume without .nii/.nii.gz; None for any other file."""
    name = Path(path).name
    return next((name[: -len(s)] for s in VOLUME_SUFFIXES if name.endswith(s) and len(name) > len(s)), None)


def volume_key(value: object) -> str:
    """How a label CSV's volume value meets a file name: without .nii/.nii.gz, and a number without its
    leading zeros (CT-ICH's PatientNumber 49 names 049.nii)."""
    text = str(value).strip()
    text = volume_name(text) or text
    return str(int(float(text))) if re.fullmatch(r"\d+(\.0*)?", text) else text


@dataclass
class VolumeSource:
    """A folder of NIfTI CT volumes and their slice labels: the `data.*` keys of conf/data/nifti.yaml, checked."""

    volumes: Path
    labels: Path | None = None  # a CSV of slice labels ...
    masks: Path | None = None  # ... or a folder of masks named like the volumes
    mask_labels: dict[int, str] = field(default_factory=dict)  # mask value -> subtype
    min_mask_pixels: int = 0
    label_columns: dict[str, str] = field(default_factory=dict)  # CSV column -> role (volume, slice, a label)
    first_slice: int = 1
    patient_pattern: str | None = None  # a regex whose first group is the patient in a volume's file name

    def __post_init__(self) -> None:
        if (self.labels is None) == (self.masks is None):
            raise ValueError("data=nifti takes slice labels from a CSV or from masks: set exactly one of "
                             "data.labels=CSV and data.masks=FOLDER.")
        try:
            self.mask_labels = {int(value): str(name) for value, name in dict(self.mask_labels or {}).items()}
        except (TypeError, ValueError) as err:
            raise ValueError(f"data.mask_labels={self.mask_labels}: map whole mask values to subtypes, "
                             "e.g. {1: epidural, 2: intraparenchymal}.") from err
        wrong = sorted(set(self.mask_labels.values()) - set(SUBTYPES))
        if wrong:
            raise ValueError(f"data.mask_labels maps to {wrong}: mask values map to subtypes ({', '.join(SUBTYPES)}).")
        self.label_columns = {str(column): str(role) for column, role in dict(self.label_columns or {}).items()}
        wrong = sorted(set(self.label_columns.values()) - set(ROLES))
        if wrong:
            raise ValueError(f"data.label_columns maps columns to {wrong}: a column holds one of {', '.join(ROLES)}.")
        if self.patient_pattern:
            try:
                re.compile(self.patient_pattern)
            except re.error as err:
                raise ValueError(f"data.patient_pattern={self.patient_pattern!r} is no regular expression ({err}).") from err

    # -- which labels there are ---------------------------------------------------------------------

    def known_labels(self) -> set[str]:
        """The labels this source gives: from masks `any` and the mapped subtypes; from a CSV its label columns,
        and `any` from the five subtypes when it has no column of its own."""
        if self.masks is not None:
            return {"any", *self.mask_labels.values()}
        roles = set(self._roles(pd.read_csv(self._csv(), nrows=0).columns).values())
        return roles & set(LABELS) | ({"any"} if set(SUBTYPES) <= roles else set())

    def check_labels(self, required: tuple[str, ...]) -> None:
        """Refuse a task whose labels this source cannot give, before anything is read."""
        missing = [name for name in required if name not in self.known_labels()]
        if not missing:
            return
        if self.masks is not None:
            raise ValueError(f"The task needs {', '.join(missing)}, which masks give only through data.mask_labels: "
                             "map mask values to them (BHSD: {1: epidural, 2: intraparenchymal, 3: intraventricular, "
                             "4: subarachnoid, 5: subdural}), or train task=binary on `any`.")
        raise ValueError(f"The task needs {', '.join(missing)}, which {self.labels} has no column for: name the "
                         "columns with data.label_columns, or train task=binary on `any`.")

    def _csv(self) -> Path:
        if not self.labels.is_file():
            raise FileNotFoundError(f"data.labels={self.labels} does not exist: give the CSV of slice labels "
                                    "(CT-ICH: hemorrhage_diagnosis_raw_ct.csv).")
        return self.labels

    def _roles(self, columns) -> dict[str, str]:
        """CSV column -> what it holds: data.label_columns first, then columns named as a role in any case."""
        roles = {}
        for column in columns:
            role = self.label_columns.get(column, str(column).strip().lower())
            if role in ROLES:
                roles[column] = role
        twice = sorted(role for role, count in Counter(roles.values()).items() if count > 1)
        if twice:
            raise ValueError(f"{self.labels}: several columns hold {twice}; keep one with data.label_columns.")
        return roles

    def read_labels(self) -> pd.DataFrame:
        """One row per (volume, slice number) with the labels the CSV gives, 0/1."""
        table = pd.read_csv(self._csv(), dtype=str)
        roles = self._roles(table.columns)
        ignored = [column for column in table.columns if column not in roles]
        if ignored:
            log.info("%s: ignoring columns %s (no label of %s)", self.labels.name, ignored, ", ".join(LABELS))
        table = table[list(roles)].rename(columns=roles)
        missing = [role for role in ("volume", "slice") if role not in table]
        if missing:
            raise ValueError(f"{self.labels} has no {' or '.join(missing)} column: name yours with data.label_columns "
                             "(CT-ICH: {PatientNumber: volume, SliceNumber: slice}).")
        blank = table["volume"].isna() & table["slice"].isna()
        if blank.any():  # spreadsheet exports end in empty rows
            log.info("%s: %d rows without a volume or slice number dropped", self.labels.name, int(blank.sum()))
            table = table[~blank]
        labels = [name for name in LABELS if name in table]
        values = table[labels].apply(pd.to_numeric, errors="coerce")
        bad = ~values.isin([0, 1])
        if bad.any().any():
            column = bad.any()[lambda s: s].index[0]
            example = table.loc[bad[column], column].iloc[0]
            raise ValueError(f"{self.labels}: label '{column}' has value {example!r}; labels must be 0 or 1.")
        number = pd.to_numeric(table["slice"], errors="coerce")
        if number.isna().any() or (number % 1 != 0).any():
            example = table.loc[number.isna() | (number % 1 != 0), "slice"].iloc[0]
            raise ValueError(f"{self.labels}: slice number {example!r} is no whole number; fix the file.")
        out = pd.DataFrame({"volume": table["volume"].map(volume_key), "number": number.astype(np.int64)})
        for name in labels:
            out[name] = values[name].astype("int8")
        if "any" not in labels and set(SUBTYPES) <= set(labels):
            out["any"] = out[list(SUBTYPES)].max(axis=1).astype("int8")
        out = out.drop_duplicates()
        conflicts = out.duplicated(["volume", "number"], keep=False)
        if conflicts.any():
            volume, number = out.loc[conflicts, ["volume", "number"]].iloc[0]
            raise ValueError(f"{self.labels}: slice {number} of volume {volume} has contradicting rows; fix the file.")
        return out

    # -- the index ------------------------------------------------------------------------------------

    def settings(self) -> str:
        """What the index depends on besides the files: a changed setting builds another index."""
        return json.dumps({"source": "nifti", "mask_labels": sorted(self.mask_labels.items()),
                           "min_mask_pixels": self.min_mask_pixels, "label_columns": sorted(self.label_columns.items()),
                           "first_slice": self.first_slice, "patient_pattern": self.patient_pattern})

    def index(self, cache_dir: Path, workers: int | None = None, force: bool = False):
        """The index of every labelled slice of every readable volume, built (and the volumes unpacked) on first
        use, reused while the volume folder and the labels are unchanged; as load_or_build_index."""
        labels = self.labels if self.labels is not None else self.masks
        folder = index_dir(cache_dir, self.volumes, labels, self.settings())
        return cached_index(folder, self.volumes, labels, lambda: self._build(folder / "slices", workers), force)

    def _build(self, out: Path, workers: int | None) -> tuple[pd.DataFrame, pd.DataFrame, IndexSummary]:
        files = list_volumes(self.volumes)
        summary = IndexSummary(files_found=len(files))
        skipped: list[dict] = []
        table = self.read_labels() if self.labels is not None else None
        labelled = set() if table is None else set(table["volume"])
        jobs, seen = [], set()
        for path in files:
            name = volume_name(path)
            if name in seen:  # a.nii beside a.nii.gz: their slices would share ids
                skipped.append(_skip(name, "duplicate", f"{path}: another volume of this name was found first"))
                continue
            seen.add(name)
            if table is not None:
                if volume_key(name) not in labelled:
                    skipped.append(_skip(name, "no_label", f"{path} has no row in {self.labels}"))
                    continue
                jobs.append((str(path), None))
                continue
            mask = next((self.masks / f"{name}{s}" for s in VOLUME_SUFFIXES if (self.masks / f"{name}{s}").is_file()), None)
            if mask is None:
                skipped.append(_skip(name, "no_label", f"{path} has no mask named like it in {self.masks}"))
                continue
            jobs.append((str(path), str(mask)))
        if table is not None:
            found = {volume_key(volume_name(path)) for path in files}
            for volume in sorted(labelled - found):
                skipped.append(_skip(volume, "missing_file", f"labelled in {self.labels}, but no volume in {self.volumes}"))

        if out.exists():
            shutil.rmtree(out)  # slices of an earlier build: they would outlive their volumes
        out.mkdir(parents=True)
        rows, unmapped = [], Counter()
        for result in _unpack_all(jobs, out, self, workers or os.cpu_count() or 1):
            if "skip" in result:
                skipped.append(result)
            else:
                rows += result["rows"]
                unmapped.update(result["unmapped"])
        if unmapped:
            log.log(logging.WARNING if self.mask_labels else logging.INFO,
                    "Mask values %s (in %s slices) are not in data.mask_labels: they count toward `any` only",
                    sorted(unmapped), sum(unmapped.values()))
        index = pd.DataFrame(rows)
        if table is not None and len(index):
            index, unlabelled = self._merge(index, table)
            skipped += unlabelled
        if index.empty:
            raise ValueError(f"None of the {len(files)} volumes under {self.volumes} gave a labelled slice "
                             "(see skipped.csv).")
        for name in LABELS:
            index[name] = index[name].fillna(0).astype("int8") if name in index else np.int8(0)
        index = self._identify(index)
        summary.read = len(index)
        summary.positives = {name: int(index[name].sum()) for name in LABELS}
        summary.skipped = dict(Counter(row["skip"] for row in skipped))
        return add_slice_order(index), pd.DataFrame(skipped, columns=["image_id", "skip", "detail"]), summary

    def _merge(self, index: pd.DataFrame, table: pd.DataFrame) -> tuple[pd.DataFrame, list[dict]]:
        """The CSV's labels on the unpacked slices; a slice without a row, or a row without a slice, is skipped."""
        index = index.assign(key=index["volume"].map(volume_key))
        merged = index.merge(table, left_on=["key", "number"], right_on=["volume", "number"], how="outer",
                             suffixes=("", "_csv"), indicator=True)
        unlabelled = merged.loc[merged["_merge"] == "left_only", ["image_id", "number", "volume"]]
        skipped = [_skip(i, "no_label", f"slice {n} of {v}: no row in {self.labels}")
                   for i, n, v in unlabelled.itertuples(index=False)]
        read = set(index["key"])
        beyond = merged[(merged["_merge"] == "right_only") & merged["volume_csv"].isin(read)]
        skipped += [_skip(f"{v}_{n:03d}", "missing_file", f"labelled in {self.labels}, but volume {v} has no slice {n}")
                    for v, n in beyond[["volume_csv", "number"]].itertuples(index=False)]
        kept = merged[merged["_merge"] == "both"].drop(columns=["key", "volume_csv", "_merge"])
        return kept.reset_index(drop=True), skipped

    def _identify(self, index: pd.DataFrame) -> pd.DataFrame:
        """Pseudonymised patient, study and series: a volume is one series of one study; its patient is the
        volume itself unless data.patient_pattern finds one in the file name (BHSD names hold the patient)."""
        names = index["volume"]
        patients = names.map(self._patient)
        unmatched = names[patients.isna()].unique()
        if len(unmatched):
            log.warning("data.patient_pattern finds no patient in %d volume names (%s): each is its own patient",
                        len(unmatched), ", ".join(unmatched[:5]))
        patients = patients.fillna(names)
        ids = {name: pseudonym(name) for name in names.unique()}
        index = index.assign(patient=[pseudonym(p) for p in patients], study=names.map(ids), series=names.map(ids))
        return index.drop(columns=["volume", "number"])

    def _patient(self, name: str) -> str | None:
        if not self.patient_pattern:
            return name
        match = re.search(self.patient_pattern, name)
        return None if match is None else match.group(1) if match.groups() else match.group(0)


def list_volumes(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist: set data.root and data.image_dir to the folder of CT volumes.")
    files = sorted(path for path in folder.iterdir() if volume_name(path) and path.is_file())
    if not files:
        raise FileNotFoundError(f"No .nii or .nii.gz volumes in {folder}: set data.image_dir to the folder of CT "
                                "volumes (CT-ICH: ct_scans).")
    check_unique_ids([volume_name(path) for path in files], [path.name for path in files],
                     "a volume's slices are named by its file name without .nii/.nii.gz: keep one file per volume.")
    return files


def _skip(image_id: str, reason: str, detail: str) -> dict:
    return {"image_id": image_id, "skip": reason, "detail": detail}


def _unpack_all(jobs: list[tuple[str, str | None]], out: Path, source: VolumeSource, workers: int):
    settings = dict(out=str(out), first_slice=source.first_slice, mask_labels=source.mask_labels,
                    min_pixels=source.min_mask_pixels)
    progress = dict(total=len(jobs), desc="Unpacking volumes", unit="volume", mininterval=1.0)
    if workers <= 1 or len(jobs) < 4:
        yield from tqdm((unpack_volume(path, mask, **settings) for path, mask in jobs), **progress)
        return
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
        futures = [pool.submit(unpack_volume, path, mask, **settings) for path, mask in jobs]
        yield from tqdm((future.result() for future in futures), **progress)


def _read(path: str) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI file's data (scaled by its slope and intercept, as nibabel's dataobj is) and affine; trailing
    axes of length 1 dropped."""
    image = nib.load(path)
    data = np.asanyarray(image.dataobj)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return data, image.affine


def unpack_volume(path: str, mask_path: str | None, out: str, first_slice: int, mask_labels: Mapping[int, str],
                  min_pixels: int) -> dict:
    """Read one volume (and its mask) once; write its slices in anatomical order as .npy files of int16 HU.

    Returns {"rows": one index row per slice, "unmapped": mask values outside mask_labels} or a skip row.
    """
    name = volume_name(path)
    try:
        data, affine = _read(path)
    except Exception as err:  # nibabel and gzip fail in many ways on a damaged file; each means "unreadable"
        return _skip(name, "unreadable",
                     f"{path} is not a readable NIfTI volume ({error_line(err)}): re-export it or leave it out.")
    if data.ndim != 3:
        return _skip(name, "not_volume", f"{path} has shape {data.shape}, not one 3D volume: leave it out.")
    orientation = nib.orientations.io_orientation(affine)
    if np.isnan(orientation).any():
        return _skip(name, "not_volume", f"{path} has an affine that gives no orientation: fix its sform/qform.")
    mask = None
    if mask_path is not None:
        try:
            mask, _ = _read(mask_path)
        except Exception as err:  # as above
            return _skip(name, "unreadable", f"its mask {mask_path} is not a readable NIfTI file ({error_line(err)}).")
        if mask.shape != data.shape:
            return _skip(name, "mask_shape", f"its mask {mask_path} has shape {mask.shape}, the volume {data.shape}: "
                                             "a mask must lie on its volume's voxels.")
        mask = nib.orientations.apply_orientation(mask if mask.dtype.kind in "iub" else np.rint(mask), orientation)
    volume = nib.orientations.apply_orientation(data, orientation)  # axes now point right, anterior, superior
    frame = affine @ nib.orientations.inv_ornt_aff(orientation, data.shape)
    normal = np.cross(frame[:3, 0], frame[:3, 1])
    normal /= np.linalg.norm(normal)
    stored_axis = int(np.flatnonzero(orientation[:, 0] == 2)[0])
    flipped = orientation[stored_axis, 1] < 0
    count = volume.shape[2]
    # a slice's rows step along the volume's second axis, its columns along the first (below)
    spacing = [float(np.linalg.norm(frame[:3, 1])), float(np.linalg.norm(frame[:3, 0]))]
    rows, unmapped = [], Counter()
    for k in range(count):
        number = (count - 1 - k if flipped else k) + first_slice  # as the file stores it, as a label CSV counts
        image_id = f"{name}_{number:03d}"
        # axes (right, anterior) -> rows posterior-ward and columns towards the patient's left, as DICOM shows them
        hu = np.clip(np.asarray(volume[::-1, ::-1, k].T, dtype=np.float32), AIR_HU, MAX_HU)
        pixels = np.rint(hu).astype(np.int16)
        target = Path(out) / f"{image_id}{UNPACKED_SUFFIX}"
        np.save(target, pixels)
        row = {
            "image_id": image_id, "path": str(target), "volume": name, "number": number,
            "position": float(normal @ (frame @ np.array([0.0, 0.0, k, 1.0]))[:3]), "instance": math.nan,
            "window_center": math.nan, "window_width": math.nan, "bits_stored": 16, "pixel_representation": 1,
            "rows": pixels.shape[0], "columns": pixels.shape[1], "brain_fraction": brain_fraction(pixels),
            "field_of_view_mm": field_of_view(spacing, *pixels.shape), **head_figures(hu),
        }
        if mask is not None:
            labels, others = mask_slice_labels(mask[::-1, ::-1, k].T, mask_labels, min_pixels)
            row.update(labels)
            unmapped.update(others)
        rows.append(row)
    return {"rows": rows, "unmapped": unmapped}


def mask_slice_labels(mask: np.ndarray, mask_labels: Mapping[int, str], min_pixels: int) -> tuple[dict, list[int]]:
    """The six labels of one slice from its mask, and the non-zero values found that mask_labels does not map."""
    values, counts = np.unique(mask, return_counts=True)
    values = values.astype(np.int64)
    nonzero = values != 0
    labels = {"any": int(counts[nonzero].sum() > min_pixels)}
    for subtype in SUBTYPES:
        mapped = [value for value, name in mask_labels.items() if name == subtype]
        labels[subtype] = int(counts[np.isin(values, mapped)].sum() > min_pixels)
    return labels, [int(v) for v in values[nonzero] if int(v) not in mask_labels]
