"""One pass over every DICOM of a dataset, kept as a parquet index beside the cache.

The pass reads each file once (in parallel, with a progress bar) and records what training needs
without touching pixels again: who the slice belongs to (pseudonymised), where it sits along its
series, its window tags and bit depth, its labels, and how much of it is brain (for the blank-slice
filter). Files that cannot be read are counted per reason and listed in `skipped.csv`, never dropped
silently. NIfTI volumes become series of the same table (ich.data.nifti), kept and refreshed the same way.
"""

import hashlib
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ich.core.privacy import pseudonym
from ich.core.results import write_atomic
from ich.core.tasks import LABELS
from ich.data.dicom import CT_ONLY, DicomReadError, admitted_modalities, read_slice
from ich.data.order import ORDER_SOURCES, slice_order
from ich.data.sources import check_unique_ids, image_ids

log = logging.getLogger(__name__)

# 3: InstanceNumber and the source of each series' slice order (`instance`, `order`); 4: positions along the normal
# turned toward the head, and positions that do not tell slices apart ordered as missing ones (ich.data.order);
# 5: an unlabelled folder's image ids are paths below it (file names repeat across a hospital export's series);
# 6: each slice's field of view and the HU figures of its head (head_figures), what a checkpoint's training range of
# them is made of (ich.data.seen)
INDEX_VERSION = 6
BRAIN_HU = (0.0, 80.0)  # the brain window: CSF, grey and white matter, fresh blood
HEAD_HU = -500.0  # denser than this is the head (scalp, bone, brain, blood); air and the padding outside the field are not
SOFT_HU = (-50.0, 130.0)  # soft tissue, where noise is measured: brain, CSF and blood, neither bone nor air


@dataclass
class IndexSummary:
    """What one pass found; printed by `python -m ich.prepare` and kept as `summary.json`."""

    files_found: int = 0
    read: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    labels_file: str | None = None
    labels_stamp: list[float] = field(default_factory=list)  # size and mtime of the label file
    images_stamp: list[float] = field(default_factory=list)  # size and mtime of the DICOM folder itself
    positives: dict[str, int] = field(default_factory=dict)  # label -> slices
    version: int = INDEX_VERSION

    def lines(self) -> list[str]:
        out = [f"files found: {self.files_found}", f"read: {self.read}"]
        out += [f"skipped ({reason}): {count}" for reason, count in sorted(self.skipped.items())]
        if self.labels_file:
            out += [f"images with {name}: {self.positives.get(name, 0)}" for name in LABELS]
        return out


def brain_fraction(hu: np.ndarray) -> float:
    """The share of a slice's pixels in the brain's HU range, on a quarter of its rows and columns (plenty for a fraction)."""
    sample = hu[::4, ::4]
    return float(((sample >= BRAIN_HU[0]) & (sample <= BRAIN_HU[1])).mean())


def head_figures(hu: np.ndarray) -> dict[str, float]:
    """What a slice's HU say about the scanner, per slice (nan on a slice without head), measured on full-resolution
    HU as read, before any resizing:

    - `head_hu_median`: the median HU of the head's pixels (HEAD_HU), brain for the most part: moves with a scanner
      calibrated off water, a wrong RescaleIntercept, or images whose HU encoding was misread;
    - `head_brain_fraction`: the share of the head's pixels in the brain's HU range (BRAIN_HU): falls with shifted
      or rescaled HU, and with noise that spreads brain values out of the range;
    - `brain_noise_hu`: the noise of soft tissue, from the differences of horizontally neighbouring soft-tissue
      pixels (SOFT_HU; their median absolute value x 1.4826 / sqrt 2 is the standard deviation of white noise, and
      the few edges between tissues do not move a median): a noisier scanner or a sharper kernel raises it.

    A sample is enough for a median and a share: a quarter of the rows and columns for the head, as for
    brain_fraction; every eighth row, whole, for the noise (neighbours must be next to each other). About 1-2 ms a
    512 x 512 slice.
    """
    sample = hu[::4, ::4]
    head = sample[sample > HEAD_HU]
    if not head.size:
        return {"head_hu_median": math.nan, "head_brain_fraction": math.nan, "brain_noise_hu": math.nan}
    rows = hu[::8]
    soft = (rows >= SOFT_HU[0]) & (rows <= SOFT_HU[1])
    steps = np.abs(np.diff(rows, axis=1)[soft[:, 1:] & soft[:, :-1]])
    return {
        "head_hu_median": float(np.median(head)),
        "head_brain_fraction": float(((head >= BRAIN_HU[0]) & (head <= BRAIN_HU[1])).mean()),
        "brain_noise_hu": float(np.median(steps)) * 1.4826 / math.sqrt(2) if steps.size else math.nan,
    }


def scan_file(path: str, modalities: Sequence[str] = CT_ONLY) -> dict:
    """Index one file; an unreadable one (or one of a modality not admitted) comes back as a row with a `skip` reason."""
    try:
        header, hu = read_slice(path, modalities)
    except DicomReadError as err:
        return {"image_id": Path(path).stem, "skip": err.reason, "detail": str(err)}
    return {
        "image_id": header.image_id,
        "path": path,
        "patient": pseudonym(header.patient),
        "study": pseudonym(header.study),
        "series": pseudonym(header.series),
        "position": header.position,
        "instance": header.instance,
        "window_center": header.window_center,
        "window_width": header.window_width,
        "bits_stored": header.bits_stored,
        "pixel_representation": header.pixel_representation,
        "rows": header.rows,
        "columns": header.columns,
        "brain_fraction": brain_fraction(hu),
        "field_of_view_mm": header.field_of_view,
        **head_figures(hu),
    }


def _scan_all(paths: list[str], workers: int, modalities: Sequence[str]) -> list[dict]:
    progress = dict(total=len(paths), desc="Indexing DICOMs", unit="file", mininterval=1.0)
    scan = partial(scan_file, modalities=tuple(modalities))
    if workers <= 1 or len(paths) < 64:
        return [scan(p) for p in tqdm(paths, **progress)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(scan, paths, chunksize=32), **progress))


def add_slice_order(index: pd.DataFrame) -> pd.DataFrame:
    """Order slices within each series by ich.data.order.slice_order, and record in `order` what the order rests
    on (RSNA files: position; secondary captures converted from volumes: often InstanceNumber)."""
    codes = pd.factorize(index["series"])[0]
    rows = np.argsort(codes, kind="stable")
    starts = np.flatnonzero(np.diff(codes[rows])) + 1
    positions = index["position"].to_numpy(np.float64)
    instances = index["instance"].to_numpy(np.float64) if "instance" in index else np.full(len(index), np.nan)
    names = index["path"].to_numpy()
    slice_index = np.empty(len(index), np.int32)
    source = np.empty(len(index), object)
    for members in np.split(rows, starts):
        order, how = slice_order(positions[members], instances[members], names[members])
        slice_index[members[order]] = np.arange(len(members))
        source[members] = how
    index = index.assign(order=pd.Categorical(source, categories=ORDER_SOURCES), slice_index=slice_index)
    index = index.sort_values(["series", "slice_index"], kind="stable")
    index["series_length"] = index.groupby("series")["image_id"].transform("size").astype("int32")
    for how, named in (("instance", "InstanceNumber"), ("file", "file name")):
        count = index.loc[index["order"] == how, "series"].nunique()
        if count:
            log.warning("%d series have slices whose ImagePositionPatient is missing or the same as another's: "
                        "ordered by %s (the index's `order` column says which), so data.context rests on that order",
                        count, named)
    return index.reset_index(drop=True)


def list_dicoms(image_dir: Path) -> list[Path]:
    files = sorted(image_dir.rglob("*.dcm"))
    if not files:
        raise FileNotFoundError(f"No .dcm files under {image_dir}: check data.root / data.image_dir.")
    return files


def build_index(
    image_dir: Path, labels: pd.DataFrame | None, workers: int, modalities: Sequence[str] = CT_ONLY
) -> tuple[pd.DataFrame, pd.DataFrame, IndexSummary]:
    """Scan every DICOM under `image_dir` that has a label (or every one, when `labels` is None), and merge
    the labels in: the index is the one table of slices that training reads."""
    files = list_dicoms(image_dir)
    names = [str(f.relative_to(image_dir)) for f in files]
    if labels is not None:  # labels name a DICOM by its file name, as RSNA's do
        check_unique_ids([f.stem for f in files], names,
                         "a DICOM's image id is its file name (as RSNA's labels name it): keep one copy of each file.")
        id_of = {str(f): f.stem for f in files}
    else:  # no labels to match: a hospital export repeats file names (IM0000) in every series folder
        id_of = dict(zip(map(str, files), image_ids(names)))
    summary = IndexSummary(files_found=len(files))
    skipped: list[dict] = []
    if labels is not None:
        known = set(labels["image_id"])
        unlabelled = [f for f in files if f.stem not in known]
        skipped += [{"image_id": f.stem, "skip": "no_label", "detail": "no row in the label file"} for f in unlabelled]
        files = [f for f in files if f.stem in known]
        missing = sorted(known - {f.stem for f in files})
        skipped += [{"image_id": i, "skip": "missing_file", "detail": "labelled, but no DICOM file"} for i in missing]
    paths = [str(f) for f in files]
    rows = [{**row, "image_id": id_of[path]} for path, row in zip(paths, _scan_all(paths, workers, modalities))]
    skipped += [row for row in rows if "skip" in row]
    index = pd.DataFrame([row for row in rows if "skip" not in row])
    if index.empty:
        raise ValueError(f"None of the {summary.files_found} DICOMs under {image_dir} could be used (see skipped.csv).")
    if labels is not None:
        index = index.merge(labels, on="image_id", how="inner", validate="one_to_one")
        summary.positives = {name: int(index[name].sum()) for name in LABELS}
    summary.read = len(index)
    summary.skipped = dict(Counter(row["skip"] for row in skipped))
    skipped_table = pd.DataFrame(skipped, columns=["image_id", "skip", "detail"])
    return add_slice_order(index), skipped_table, summary


def index_dir(cache_dir: Path, image_dir: Path, labels_csv: Path | None, settings: str = "") -> Path:
    """A cache folder per (image folder, label file) pair, and per reading settings when they are not the default."""
    key = f"{image_dir.resolve()}|{labels_csv.resolve() if labels_csv else ''}" + (f"|{settings}" if settings else "")
    return cache_dir / f"index-{image_dir.name}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def file_stamp(path: Path | None) -> list[float]:
    """Size and modification time of a file or folder: what tells whether the index is still fresh."""
    if path is None:
        return []
    stat = path.stat()
    return [float(stat.st_size), stat.st_mtime]


def load_or_build_index(
    image_dir: Path,
    labels_csv: Path | None,
    read_labels: Callable[[Path], pd.DataFrame] | None,
    cache_dir: Path,
    workers: int | None = None,
    force: bool = False,
    modalities: Sequence[str] = CT_ONLY,
) -> tuple[pd.DataFrame, IndexSummary, Path]:
    """The index of the DICOMs under `image_dir` with the labels of `labels_csv` (see `cached_index`).

    `modalities` are the Modality values admitted as CT slices (data.modalities); the default admits CT alone.
    """
    admitted = sorted(admitted_modalities(modalities))
    settings = "" if admitted == list(CT_ONLY) else f"modalities={','.join(admitted)}"

    def build() -> tuple[pd.DataFrame, pd.DataFrame, IndexSummary]:
        labels = read_labels(labels_csv) if labels_csv is not None and read_labels is not None else None
        return build_index(image_dir, labels, workers or os.cpu_count() or 1, admitted)

    return cached_index(index_dir(cache_dir, image_dir, labels_csv, settings), image_dir, labels_csv, build, force)


def cached_index(
    folder: Path,
    image_dir: Path,
    labels: Path | None,
    build: Callable[[], tuple[pd.DataFrame, pd.DataFrame, IndexSummary]],
    force: bool = False,
) -> tuple[pd.DataFrame, IndexSummary, Path]:
    """Reuse the index in `folder` when the image folder and the labels (a file, or a folder of masks) are
    unchanged; otherwise `build` it again and write it with its summary and `skipped.csv`.

    Whether it is fresh is told by two stat calls (the labels, the image folder), so a fresh index
    costs one parquet read: the label file (4.5 M rows for RSNA) is parsed and the folder walked only
    when the index is built. Files added to or removed from subfolders of a nested folder do not change
    the folder's own stamp: `python -m ich.prepare force=true` rescans.
    """
    index_path, summary_path = folder / "index.parquet", folder / "summary.json"
    if not force and index_path.is_file() and summary_path.is_file():
        saved = json.loads(summary_path.read_text())
        fresh = (
            saved.get("version") == INDEX_VERSION
            and saved["labels_stamp"] == file_stamp(labels)
            and saved["images_stamp"] == file_stamp(image_dir)
        )
        if fresh:
            return pd.read_parquet(index_path), IndexSummary(**saved), folder
        log.info("The files or labels under %s changed since the index was built: scanning again", image_dir)
    folder.mkdir(parents=True, exist_ok=True)
    index, skipped, summary = build()
    summary.labels_file = str(labels) if labels else None
    summary.labels_stamp = file_stamp(labels)
    summary.images_stamp = file_stamp(image_dir)
    write_atomic(index_path, lambda p: index.to_parquet(p, index=False))
    skipped.to_csv(folder / "skipped.csv", index=False)
    write_atomic(summary_path, lambda p: p.write_text(json.dumps(asdict(summary), indent=2)))
    for reason, group in skipped.groupby("skip"):
        shown = ", ".join(group["image_id"].head(10))
        more = f" and {len(group) - 10} more" if len(group) > 10 else ""
        log.warning("Skipped %d file(s) (%s): %s%s; full list in %s. %s", len(group), reason, shown, more,
                    folder / "skipped.csv", group["detail"].iloc[0])
    return index, summary, folder
