"""Hostile inputs, tried on purpose: each is a counted, reported skip or one clear sentence before training.

A messy hospital folder is built from real phantom DICOMs plus one file per kind of damage; the
index must count each damaged file under its reason, list its id, and keep every good slice.
"""

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import get_decoder
from pydicom.uid import JPEG2000Lossless

from ich.core.tasks import LABELS
from ich.data.datamodule import ICHDataModule
from ich.data.index import load_or_build_index
from ich.data.phantom import generate
from ich.data.sources import read_rsna_labels


def damage_copy(good: Path, target: Path, change) -> None:
    ds = pydicom.dcmread(good)
    change(ds)
    ds.save_as(target)


def truncate(good: Path, target: Path) -> None:
    data = good.read_bytes()
    target.write_bytes(data[: len(data) // 2])


def set_attr(name, value):
    def change(ds):
        setattr(ds, name, value)

    return change


def drop_pixels(ds):
    del ds.PixelData


def two_frames(ds):
    ds.NumberOfFrames = 2


# file name -> (how to make it from a good file, the skip reason users should see)
DAMAGE = {
    "ID_truncated": (truncate, "bad_pixel_data"),
    "ID_nopixels": (lambda good, t: damage_copy(good, t, drop_pixels), "no_pixel_data"),
    "ID_notdicom": (lambda good, t: t.write_text("this is a report, not an image"), "unreadable"),
    "ID_zerobytes": (lambda good, t: t.write_bytes(b""), "unreadable"),
    "ID_multiframe": (lambda good, t: damage_copy(good, t, two_frames), "multi_frame"),
    "ID_wrongsize": (lambda good, t: damage_copy(good, t, set_attr("Rows", 100)), "bad_pixel_data"),
    "ID_nanslope": (lambda good, t: damage_copy(good, t, set_attr("RescaleSlope", "nan")), "bad_header"),
    "ID_zeroslope": (lambda good, t: damage_copy(good, t, set_attr("RescaleSlope", 0)), "bad_header"),
    "ID_mri": (lambda good, t: damage_copy(good, t, set_attr("Modality", "MR")), "not_ct"),
    "ID_jpeg2000": (lambda good, t: shutil.copy(get_testdata_file("J2K_pixelrep_mismatch.dcm"), t), "no_decoder"),
}


@pytest.fixture
def messy_folder(tmp_path, monkeypatch):
    """An RSNA-layout folder: 4 patients of good phantom slices, one damaged file per kind, label oddities."""
    root = tmp_path / "hospital"
    generate(root, patients=4, slices=3, size=64, seed=5, quirks=False)
    images = root / "stage_2_train"
    good = sorted(images.glob("*.dcm"))[0]
    for name, (make, _) in DAMAGE.items():
        make(good, images / f"{name}.dcm")
    shutil.copy(good, images / "ID_nolabel.dcm")  # a file nobody labelled
    labels = pd.read_csv(root / "stage_2_train.csv")
    extra = [(f"{name}_{label}", 0) for name in [*DAMAGE, "ID_nofile"] for label in LABELS]
    pd.concat([labels, pd.DataFrame(extra, columns=["ID", "Label"])]).to_csv(root / "stage_2_train.csv", index=False)
    # this machine has the JPEG 2000 plugins; a hospital machine may not
    monkeypatch.setattr(get_decoder(JPEG2000Lossless), "_available", {})
    return root


def test_every_damaged_file_is_skipped_counted_and_listed(messy_folder, tmp_path, caplog):
    csv = messy_folder / "stage_2_train.csv"
    index, summary, folder = load_or_build_index(messy_folder / "stage_2_train", csv, read_rsna_labels, tmp_path / "cache")
    assert len(index) == 12, "every good slice is kept"
    expected = pd.Series([reason for _, reason in DAMAGE.values()]).value_counts().to_dict()
    assert summary.skipped == {**expected, "no_label": 1, "missing_file": 1}
    # listed by id, so a user can find them: ID_nofile is labelled but has no DICOM
    skipped = pd.read_csv(folder / "skipped.csv").set_index("image_id")["skip"]
    assert skipped.to_dict() == {**{name: reason for name, (_, reason) in DAMAGE.items()}, "ID_nolabel": "no_label",
                                 "ID_nofile": "missing_file"}
    # each reason is reported once on the console, with the ids
    assert "ID_mri" in caplog.text and "not_ct" in caplog.text
    assert "pip install" in pd.read_csv(folder / "skipped.csv").set_index("image_id").loc["ID_jpeg2000", "detail"]


def test_a_run_summary_states_used_and_skipped_slices(messy_folder, tmp_path):
    dm = ICHDataModule(source="rsna", root=str(messy_folder), cache_dir=str(tmp_path / "cache"), image_size=32,
                       num_workers=0, split=(0.5, 0.0, 0.5), seed=0)
    dm.prepare_data()
    dm.setup()
    assert sum(dm.summary["slices"].values()) == 12
    assert dm.summary["skipped"]["not_ct"] == 1 and dm.summary["skipped"]["missing_file"] == 1
    assert sum(dm.summary["skipped"].values()) == len(DAMAGE) + 2


def test_empty_dataset_after_filtering_is_one_sentence(messy_folder, tmp_path):
    dm = ICHDataModule(source="rsna", root=str(messy_folder), cache_dir=str(tmp_path / "cache"), image_size=32,
                       num_workers=0, split=(0.5, 0.0, 0.5), min_brain_fraction=1.0)
    dm.prepare_data()
    with pytest.raises(ValueError, match="No slices left"):
        dm.setup()


def test_a_folder_with_nothing_usable_is_one_sentence(tmp_path):
    images = tmp_path / "stage_2_train"
    images.mkdir()
    (images / "ID_a.dcm").write_bytes(b"")
    pd.DataFrame([(f"ID_a_{label}", 0) for label in LABELS], columns=["ID", "Label"]).to_csv(
        tmp_path / "stage_2_train.csv", index=False
    )
    dm = ICHDataModule(source="rsna", root=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="None of the 1 DICOMs"):
        dm.prepare_data()


def test_missing_label_file_names_the_fix(tmp_path):
    (tmp_path / "stage_2_train").mkdir()
    dm = ICHDataModule(source="rsna", root=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="No RSNA label file"):
        dm.prepare_data()


def test_a_slice_that_breaks_mid_epoch_is_skipped_not_fatal(tmp_path, caplog):
    """The index read every file once; one damaged afterwards drops out of its batch with a warning."""
    import cv2
    import torch

    from ich.data.dataset import ImageLoader, SliceDataset, as_bytes, collate_skipping

    cv2.imwrite(str(tmp_path / "good.png"), np.full((40, 40), 128, np.uint8))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    loader = ImageLoader(as_bytes([tmp_path / "good.png", tmp_path / "broken.png"]), 32)
    dataset = SliceDataset(np.array([[0], [1]]), np.zeros((2, 1), np.float32), as_bytes(["good", "broken"]), loader)
    batch = collate_skipping([dataset[0], dataset[1]])
    assert batch["image_id"] == ["good"] and batch["image"].shape == (1, 3, 32, 32)
    assert torch.equal(batch["image"], torch.full_like(batch["image"], 128))
    assert "Skipping broken" in caplog.text


class _Payload:
    """Unpickling this runs code: it would create the file named `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    import pickle

    import torch

    from conftest import compose_config
    from ich.evaluate import run as evaluate

    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "checkpoints" / "evil.ckpt"
    checkpoint.parent.mkdir()
    torch.save({"state_dict": {}, "hyper_parameters": {"task": _Payload(marker)}}, checkpoint)
    cfg = compose_config("evaluate", [f"ckpt_path={checkpoint}", f"output_dir={tmp_path / 'eval'}", "data=phantom"])
    with pytest.raises(pickle.UnpicklingError):
        evaluate(cfg, overrides=[])
    assert not marker.exists(), "the pickled payload must never run"
