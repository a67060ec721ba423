"""Where slices and their labels come from: the RSNA 2019 layout, or a folder of PNG/JPG images.

Each reader returns one table with an `image_id` per slice and the six label columns, so the
rest of the data layer never needs to know which layout the data arrived in.
"""

import logging
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import pandas as pd

from ich.core.tasks import LABELS

log = logging.getLogger(__name__)

RSNA_LABEL_FILES = ("stage_2_train.csv", "stage_1_train.csv")
RSNA_IMAGE_DIRS = ("stage_2_train", "stage_2_train_images", "stage_1_train_images")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Optional columns of an image folder's CSV that order its slices: the series (default: the patient) and
# the slice's number along the head.
ORDER_COLUMNS = ("series", "slice")


def check_unique_ids(ids: Sequence[str], files: Sequence[str], fix: str) -> None:
    """Every slice its own image id: two slices under one id would take each other's labels, predictions and
    stage-2 embeddings without a word. `fix` is what the user does about a repeat."""
    table = pd.DataFrame({"id": ids, "file": files})
    repeated = table[table["id"].duplicated(keep=False)]
    if len(repeated):
        image_id = repeated["id"].iloc[0]
        first, second = repeated.loc[repeated["id"] == image_id, "file"].iloc[:2]
        raise ValueError(f"{first} and {second} both get the image id {image_id}: {fix}")


def image_ids(filenames: Sequence[str]) -> list[str]:
    """Each image's id: its path below the folder that every image shares, without the suffix. A flat folder's
    `1.png` is `1`; CT-ICH's `p1/1.png` beside `p2/1.png` is `p1/1`, so a file name may repeat across folders."""
    paths = [PurePosixPath(name.replace("\\", "/")) for name in filenames]
    folders = [path.parent.parts for path in paths]
    shared = 0
    while all(len(parts) > shared for parts in folders) and len({parts[shared] for parts in folders}) == 1:
        shared += 1
    return [str(PurePosixPath(*path.with_suffix("").parts[shared:])) for path in paths]


def find_rsna_labels(root: Path) -> Path:
    for name in RSNA_LABEL_FILES:
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"No RSNA label file in {root}: expected {' or '.join(RSNA_LABEL_FILES)}; "
        "point data.root at the folder of the Kaggle 'rsna-intracranial-hemorrhage-detection' download."
    )


def find_rsna_images(root: Path, image_dir: str | None = None) -> Path:
    """The DICOM folder of an RSNA download; `data.image_dir` names it when it is not a Kaggle name."""
    candidates = [root / image_dir] if image_dir else [root / name for name in RSNA_IMAGE_DIRS]
    for folder in candidates:
        if folder.is_dir():
            return folder
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"No DICOM folder found (tried {tried}): set data.image_dir to the folder of .dcm files.")


def _check_binary(table: pd.DataFrame, source: Path) -> None:
    values = table[[c for c in table.columns if c in LABELS]]
    bad = ~values.isin([0, 1])
    if bad.any().any():
        column = bad.any()[lambda s: s].index[0]
        example = values.loc[bad[column], column].iloc[0]
        raise ValueError(f"{source}: label '{column}' has value {example!r}; labels must be 0 or 1.")


def read_rsna_labels(csv_path: Path) -> pd.DataFrame:
    """Read Kaggle's `ID,Label` rows (six per image) into one row per image.

    The real file repeats some rows; exact repeats are dropped, and an image whose repeated rows
    disagree is an error, because no label can be trusted for it.
    """
    rows = pd.read_csv(csv_path, dtype={"ID": str})
    if list(rows.columns[:2]) != ["ID", "Label"]:
        raise ValueError(f"{csv_path}: expected the columns ID,Label (Kaggle RSNA layout), found {list(rows.columns)}.")
    parts = rows["ID"].str.rsplit("_", n=1, expand=True)
    rows = pd.DataFrame({"image_id": parts[0], "label": parts[1], "value": rows["Label"]})
    unknown = sorted(set(rows["label"].dropna()) - set(LABELS))
    if unknown:
        raise ValueError(f"{csv_path}: unknown label names {unknown}; RSNA labels are {', '.join(LABELS)}.")
    before = len(rows)
    rows = rows.drop_duplicates()
    duplicates = before - len(rows)
    conflicts = rows.duplicated(["image_id", "label"], keep=False)
    if conflicts.any():
        example = rows.loc[conflicts, "image_id"].iloc[0]
        raise ValueError(f"{csv_path}: image {example} has contradicting labels in repeated rows; fix the file.")
    table = rows.pivot(index="image_id", columns="label", values="value")
    missing = [name for name in LABELS if name not in table.columns]
    if missing or table.isna().any().any():
        incomplete = table.index[table.isna().any(axis=1)].tolist()[:3]
        raise ValueError(f"{csv_path}: every image needs all six labels; missing {missing or incomplete}.")
    _check_binary(table, csv_path)
    if duplicates:
        log.info("%s: dropped %d duplicated rows", csv_path.name, duplicates)
    return table[list(LABELS)].astype("int8").rename_axis(None, axis=1).reset_index()


def read_image_table(root: Path, labels_csv: Path, required: tuple[str, ...]) -> pd.DataFrame:
    """Read a CSV of PNG/JPG slices (what their pixels are is data.encoding's to say, ich.data.encoding): `filename`,
    optional `patient`, label columns, and optionally `slice` (its number along the head) and `series` (default: the
    patient).

    `required` are the labels the task needs; absent ones are an error, the others are filled
    with 0 so that every table has all six columns. With a `slice` column the table gets `position`
    and `series`, and `study` = the series (an exam), so slices can be ordered as a DICOM series is.
    """
    if not labels_csv.is_file():
        raise FileNotFoundError(f"Label file {labels_csv} not found: set data.labels to a CSV with a 'filename' column.")
    table = pd.read_csv(labels_csv, dtype={"filename": str, "patient": str})
    if "filename" not in table.columns:
        raise ValueError(f"{labels_csv}: needs a 'filename' column (image path relative to data.root).")
    absent = [name for name in required if name not in table.columns]
    if absent:
        raise ValueError(f"{labels_csv}: the task needs label column(s) {absent}; present are {list(table.columns)}.")
    unknown = [c for c in table.columns if c not in (*LABELS, "filename", "patient", *ORDER_COLUMNS)]
    if unknown:
        log.warning("%s: ignoring columns %s (not a label name of %s)", labels_csv.name, unknown, ", ".join(LABELS))
    for name in LABELS:
        if name not in table.columns:
            table[name] = 0
    _check_binary(table, labels_csv)
    if "patient" not in table.columns:
        log.warning(
            "%s has no 'patient' column: splits will be by image, so slices of one patient may leak across splits.",
            labels_csv.name,
        )
        table["patient"] = table["filename"]
    if "slice" in table.columns:
        position = pd.to_numeric(table["slice"], errors="coerce")
        if position.isna().any():
            example = table.loc[position.isna(), "slice"].iloc[0]
            raise ValueError(f"{labels_csv}: column 'slice' has {example!r}; give each image its slice number.")
        table["position"] = position.astype(float)
        table["series"] = table["series"].astype(str) if "series" in table.columns else table["patient"]
        table["study"] = table["series"]
    elif "series" in table.columns:
        log.warning("%s has a 'series' column but no 'slice' column: the slices' order is unknown", labels_csv.name)
        table = table.drop(columns="series")
    table["path"] = [str(root / name) for name in table["filename"]]
    table["image_id"] = image_ids(table["filename"])
    check_unique_ids(table["image_id"], table["filename"], f"give each image one row in {labels_csv.name} and "
                     "one file (an image's id is its path below the folder all images share, without its suffix).")
    return table
