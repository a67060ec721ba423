"""One slice order for every stage: mirrored and turned series, constant positions, copies of one instance, and
prediction admitting what training admitted.

The DICOMs are written here with plain pydicom; each expected order and each expected image is stated by hand
(the original series, feet to head), never taken from the code under test.
"""

import math

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom import config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from conftest import FAST_RUN, compose_config, make_datamodule
from ich.core.privacy import pseudonym
from ich.data.dicom import read_hu
from ich.data.index import load_or_build_index
from ich.data.order import slice_order
from ich.data.phantom import generate
from ich.inference.study import scan_folder
from ich.predict import run as predict_run
from ich.train import run as train


SLICES = 12
ROWS, COLUMNS = 16, 24  # not square, so that a transposed copy cannot pass for the original
SPACING = 0.5  # mm between pixels
ORIGIN = np.array([-6.0, -4.0, 30.0])  # the first pixel of the first (lowest) slice, LPS mm
TILT = math.radians(11)


def original_hu(k: int) -> np.ndarray:
    """Slice k (0 at the feet) as the standard axial orientation shows it: a pattern no flip or turn leaves alone."""
    return (np.arange(ROWS * COLUMNS).reshape(ROWS, COLUMNS) * 7 % 1500 - 1000 + 40 * k).astype(np.int16)


def write_slice(path, hu: np.ndarray, position, orientation, series: str, **tags) -> None:
    """One CT slice as a scanner writes it: int16 pixels under intercept -1024; a tag given as None is left out."""
    with config.disable_value_validation():
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = "P1", "1.2.3.4", series
        ds.Modality = "CT"
        ds.Rows, ds.Columns = hu.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.ImagePositionPatient = [float(v) for v in position]
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.PixelSpacing = [SPACING, SPACING]
        for keyword, value in tags.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        ds.PixelData = (hu.astype(np.int32) + 1024).astype("<i2").tobytes()
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)


X, Y = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
# name -> (the stored pixels of a standard slice, its orientation, where its first stored pixel lies from the
# standard one's): each as a scanner stores the same head, the pixels and the cosines changed together.
COPIES = {
    "standard": (lambda p: p, [1, 0, 0, 0, 1, 0], np.zeros(3)),
    "mirrored_left_right": (lambda p: p[:, ::-1], [-1, 0, 0, 0, 1, 0], (COLUMNS - 1) * SPACING * X),
    "mirrored_front_back": (lambda p: p[::-1, :], [1, 0, 0, 0, -1, 0], (ROWS - 1) * SPACING * Y),
    "transposed": (lambda p: p.T, [0, 1, 0, 1, 0, 0], np.zeros(3)),
    "turned_half_way": (lambda p: p[::-1, ::-1], [-1, 0, 0, 0, -1, 0], (COLUMNS - 1) * SPACING * X
                        + (ROWS - 1) * SPACING * Y),
}


def write_copies(root) -> dict[str, str]:
    """Each copy of the 12-slice head as its own series, file names shuffled; returns copy -> SeriesInstanceUID."""
    rng = np.random.default_rng(0)
    uids = {}
    for name, (store, orientation, shift) in COPIES.items():
        uids[name] = generate_uid()
        for k, number in enumerate(rng.permutation(SLICES)):  # file names say nothing of the order
            write_slice(root / name / f"{name}_{number:02d}.dcm", store(original_hu(k)),
                        ORIGIN + shift + [0.0, 0.0, 5.0 * k], orientation, uids[name])
    # a gantry tilted by 11 degrees: standard in-plane, each slice 5 mm along the tilted normal
    uids["tilted"] = generate_uid()
    column = [0.0, math.cos(TILT), -math.sin(TILT)]
    normal = np.cross(X, column)
    for k, number in enumerate(rng.permutation(SLICES)):
        write_slice(root / "tilted" / f"tilted_{number:02d}.dcm", original_hu(k), ORIGIN + 5.0 * k * normal,
                    [1, 0, 0, *column], uids["tilted"])
    return uids


def test_mirrored_and_turned_copies_of_a_series_read_feet_to_head_as_the_original(tmp_path):
    """Slice order (index and hospital folder) and the HU planes read are those of the standard series."""
    uids = write_copies(tmp_path / "images")
    expected = [original_hu(k) for k in range(SLICES)]

    index, summary, _ = load_or_build_index(tmp_path / "images", None, None, tmp_path / "cache")
    assert summary.read == SLICES * len(uids)
    for name, uid in uids.items():
        rows = index[index["series"] == pseudonym(uid)].sort_values("slice_index")
        assert (rows["order"] == "position").all(), name
        for k, path in enumerate(rows["path"]):
            np.testing.assert_array_equal(read_hu(path), expected[k], err_msg=f"{name}: slice {k} of the index")

    (study,) = scan_folder(tmp_path / "images", min_slices=4).studies
    by_key = {series.key: series for series in study.series}
    for name, uid in uids.items():
        series = by_key[pseudonym(uid)]
        assert not series.reason and len(series.slices) == SLICES, name
        for k, image in enumerate(series.slices):
            np.testing.assert_array_equal(read_hu(image.path), expected[k], err_msg=f"{name}: slice {k} of the study")
        assert series.slices[0].position < series.slices[-1].position  # positions grow toward the head


def write_converted(folder, series: str, **tags) -> list[str]:
    """Files a converter wrote from a volume: all at one ImagePositionPatient, InstanceNumbers 1..12 in the
    names slice1..slice12; slice n holds original_hu(n - 1). Returns the names in slice order."""
    names = [f"slice{n}" for n in range(1, SLICES + 1)]
    for n, name in enumerate(names, start=1):
        write_slice(folder / f"{name}.dcm", original_hu(n - 1), ORIGIN, [1, 0, 0, 0, 1, 0], series,
                    InstanceNumber=n, **tags)
    return names


def test_slices_at_one_position_are_ordered_by_instance_number_not_by_their_names_as_text(tmp_path):
    uid = generate_uid()
    names = write_converted(tmp_path / "images", uid)

    index, _, _ = load_or_build_index(tmp_path / "images", None, None, tmp_path / "cache")
    rows = index.sort_values("slice_index")
    assert rows["image_id"].tolist() == names  # slice1, slice2, ..., slice10, not slice1, slice10, slice11, slice2
    assert (rows["order"] == "instance").all()

    (study,) = scan_folder(tmp_path / "images", min_slices=4).studies
    (series,) = study.series
    assert [image.path.stem for image in series.slices] == names and series.order == "instance"


def test_a_slice_stored_twice_under_two_uids_does_not_cost_the_series_its_positions():
    """Positions 0, 5, 5, 10 without InstanceNumbers: still feet to head, the two copies by file name."""
    order, source = slice_order(np.array([10.0, 5.0, 0.0, 5.0]), np.full(4, np.nan), ["d", "c2", "a", "c1"])
    assert order.tolist() == [2, 3, 1, 0] and source == "position"


def test_a_truncated_copy_of_an_instance_gives_way_to_the_copy_that_reads(tmp_path):
    """Two files of one SOP Instance UID, the first in path order cut short: the series keeps all its slices."""
    uid = generate_uid()
    folder = tmp_path / "export"
    for k in range(6):
        write_slice(folder / f"s{k:02d}", original_hu(k), ORIGIN + [0.0, 0.0, 5.0 * k], [1, 0, 0, 0, 1, 0], uid)
    cut = folder / "a03"  # sorts before s03, the good copy
    cut.write_bytes((folder / "s03").read_bytes()[:-200])

    (study,) = scan_folder(folder, min_slices=4).studies
    (series,) = study.series
    assert [image.path.name for image in series.slices] == [f"s{k:02d}" for k in range(6)]
    for k, image in enumerate(series.slices):
        np.testing.assert_array_equal(read_hu(image.path), original_hu(k))
    assert [(image.path.name, image.reason) for image in series.left_out] == [("a03", "duplicate")]


def write_secondary_captures(folder, series: str) -> list[str]:
    """Slices converted from a volume as secondary captures: Modality OT, no position or orientation tags,
    InstanceNumbers against the file names' order. Returns the names in slice order."""
    names = [f"img{n:02d}" for n in range(6)]
    for k, name in enumerate(names):
        write_slice(folder / name, original_hu(k), ORIGIN, [1, 0, 0, 0, 1, 0], series, Modality="OT",
                    SOPClassUID=SecondaryCaptureImageStorage, InstanceNumber=6 - k, ImagePositionPatient=None,
                    ImageOrientationPatient=None)
    return names[::-1]


def test_a_folder_is_read_with_the_modalities_the_model_was_trained_on(tmp_path):
    names = write_secondary_captures(tmp_path / "export", generate_uid())

    (skipped,) = scan_folder(tmp_path / "export", min_slices=4).studies[0].series  # a CT model: not CT
    assert skipped.reason == "not_ct" and not skipped.slices

    (series,) = scan_folder(tmp_path / "export", 4, ["CT", "OT"]).studies[0].series
    assert not series.reason and series.order == "instance"
    assert [image.path.name for image in series.slices] == names


def test_a_checkpoint_says_which_modalities_its_data_admitted(cache_dir, tmp_path):
    """What predict.py passes to scan_folder travels in every checkpoint and exported file (`inputs`)."""
    assert make_datamodule(cache_dir, tmp_path, modalities=["CT", "OT"]).inputs["modalities"] == ["CT", "OT"]


@pytest.mark.slow
def test_predict_reads_secondary_captures_with_a_model_trained_on_them(cache_dir, tmp_path):
    """A model trained with data.modalities=[CT,OT] predicts an OT series without positions, in InstanceNumber
    order, instead of skipping its study as not_ct."""
    run_dir = tmp_path / "run"
    train(compose_config("train", [*FAST_RUN, f"output_dir={run_dir}", f"data.cache_dir={cache_dir}",
                                   "data.modalities=[CT,OT]", "test=false"]))
    summary = generate(tmp_path / "phantom", patients=1, slices=6, size=64, seed=3, quirks=False)
    (image_ids,) = summary["series"].values()
    export = tmp_path / "export"
    export.mkdir()
    for k, image_id in enumerate(image_ids):
        ds = pydicom.dcmread(tmp_path / "phantom" / "stage_2_train" / f"{image_id}.dcm")
        ds.Modality, ds.InstanceNumber = "OT", k + 1
        del ds.ImagePositionPatient, ds.ImageOrientationPatient
        with config.disable_value_validation():
            ds.save_as(export / f"{len(image_ids) - k}", enforce_file_format=True)  # names against the order

    cfg = compose_config("predict", [f"ckpt_path={run_dir}", f"input={export}", f"output_dir={tmp_path / 'out'}",
                                     "min_slices=4"])
    studies = predict_run(cfg)
    assert studies["slices"].tolist() == [6]
    slices = pd.read_csv(tmp_path / "out" / "slices.csv")
    assert len(slices) == 6 and slices["prob_any"].between(0, 1).all()
