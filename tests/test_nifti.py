"""NIfTI volumes as series of the one index: the phantom written as volumes and masks with nibabel (storage
orders, flips and oblique affines among them), read back against its own DICOM files; CT-ICH-style label
CSVs, BHSD-style masks, hostile volumes, training and evaluation on volumes, and study-level truth."""

import json
import logging
import struct

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from conftest import FAST_RUN, compose_config
from ich.core.privacy import pseudonym
from ich.core.tasks import LABELS
from ich.data.datamodule import ICHDataModule
from ich.data.dicom import read_hu
from ich.data.index import load_or_build_index
from ich.data.nifti import VolumeSource
from ich.data.phantom import SLICE_MM, generate, orientation, plan_patients, render_series
from ich.data.sources import read_rsna_labels
from ich.evaluate import read_study_labels
from ich.evaluate import run as evaluate
from ich.train import run as train

# Its module fixtures train or write the data once; under pytest-xdist (`--dist loadgroup`) the module
# stays on one worker so that they are not built again on another.

PATIENTS, SLICES, SIZE, SEED = 8, 8, 64, 3
BHSD_LABELS = "{1: epidural, 2: intraparenchymal, 3: intraventricular, 4: subarachnoid, 5: subdural}"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# How each patient's volume is stored: (axis order, reversed axes, file suffix). Axes of the base array are
# (column, row, slice) as a DICOM series lays them out; the files put them in other orders on purpose.
STORAGE = [
    ((0, 1, 2), (), ".nii.gz"),  # as most converters write a series
    ((0, 1, 2), (2,), ".nii"),  # slices stored superior to inferior
    ((2, 1, 0), (), ".nii.gz"),  # slice axis stored first
    ((1, 0, 2), (0,), ".nii"),  # rows and columns swapped, one reversed
    ((0, 1, 2), (1, 2), ".nii.gz"),
    ((2, 0, 1), (2,), ".nii"),
    ((0, 1, 2), (), ".nii"),
    ((0, 1, 2), (0, 2), ".nii.gz"),
]
SCALED = 6  # this patient's volume stores (HU + 1024) * 2 under scl_slope 0.5 and scl_inter -1024


def set_slope_inter(path, slope: float, intercept: float) -> None:
    """Write scl_slope and scl_inter (bytes 112 to 119 of a little-endian NIfTI-1 header) into a .nii file."""
    with open(path, "r+b") as file:
        file.seek(112)
        file.write(struct.pack("<2f", slope, intercept))


def series_affine(p) -> np.ndarray:
    """Voxel (column, row, slice) -> RAS mm, from the geometry the phantom writes into its DICOM headers."""
    row, column = orientation(p)
    normal = np.cross(row, column)
    rows = cols = SIZE
    corner = np.array(p.centre) - (cols - 1) / 2 * p.spacing * row - (rows - 1) / 2 * p.spacing * column
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row * p.spacing, column * p.spacing, normal * SLICE_MM, corner
    return LPS_TO_RAS @ lps


def store(array: np.ndarray, affine: np.ndarray, order, flips) -> tuple[np.ndarray, np.ndarray]:
    """The same volume with its axes in another order and some reversed, and the affine that says so."""
    stored = np.transpose(array, order)
    to_base = np.zeros((4, 4))
    to_base[3, 3] = 1
    for axis, base in enumerate(order):
        to_base[base, axis] = 1
    for axis in flips:
        stored = np.flip(stored, axis)
        flip = np.eye(4)
        flip[axis, axis], flip[axis, 3] = -1, stored.shape[axis] - 1
        to_base = to_base @ flip
    return np.ascontiguousarray(stored), affine @ to_base


def stored_slice_number(k: int, order, flips) -> int:
    """The 1-based number, along the stored slice axis, of acquisition slice k (what a CT-ICH CSV counts)."""
    axis = order.index(2)
    return (SLICES - 1 - k if axis in flips else k) + 1


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The phantom as DICOMs (stage_2_train/) and as NIfTI volumes and masks named 049... (volumes/, masks/),
    with a CT-ICH-style CSV of slice labels; and the ground truth: per patient its HU and labels by slice."""
    root = tmp_path_factory.mktemp("nifti-phantom")
    summary = generate(root, patients=PATIENTS, slices=SLICES, size=SIZE, seed=SEED, quirks=False)
    labels = read_rsna_labels(root / "stage_2_train.csv").set_index("image_id")
    (root / "volumes").mkdir()
    (root / "masks").mkdir()
    truth, rows = {}, []
    for i, p in enumerate(plan_patients(PATIENTS, SLICES, SIZE, SEED)):
        hu, mask = render_series(p, SIZE)
        order, flips, suffix = STORAGE[i]
        affine = series_affine(p)
        number = 49 + i
        volume, stored_affine = store(hu.transpose(2, 1, 0), affine, order, flips)
        stored = (volume + 1024) * 2 if i == SCALED else volume
        nib.save(nib.Nifti1Image(stored.astype(np.int16), stored_affine), root / "volumes" / f"{number:03d}{suffix}")
        if i == SCALED:
            set_slope_inter(root / "volumes" / f"{number:03d}{suffix}", 0.5, -1024.0)
        stored_mask, _ = store(mask.transpose(2, 1, 0), affine, order, flips)
        nib.save(nib.Nifti1Image(stored_mask, stored_affine), root / "masks" / f"{number:03d}{suffix}")
        slice_labels = labels.loc[list(p.image_ids), list(LABELS)].to_numpy()
        truth[number] = {"patient": p.patient_id, "hu": np.clip(hu, -1024, 3071), "labels": slice_labels,
                         "tilted": p.tilt_deg > 0}
        for k in range(SLICES):
            values = dict(zip(LABELS, slice_labels[k]))
            rows.append({"PatientNumber": number, "SliceNumber": stored_slice_number(k, order, flips),
                         "Intraventricular": values["intraventricular"], "Intraparenchymal": values["intraparenchymal"],
                         "Subarachnoid": values["subarachnoid"], "Epidural": values["epidural"],
                         "Subdural": values["subdural"], "No_Hemorrhage": 1 - values["any"], "Fracture_Yes_No": 0})
    pd.DataFrame(rows).sample(frac=1, random_state=0).to_csv(root / "hemorrhage_diagnosis_raw_ct.csv", index=False)
    with open(root / "hemorrhage_diagnosis_raw_ct.csv", "a") as csv:
        csv.write(",,,,,,,,\n,,,,,,,,\n")  # as the real file, which ends in empty rows
    return root, summary, truth


def by_volume(index: pd.DataFrame) -> dict[int, pd.DataFrame]:
    """The index rows of each volume in slice order, keyed by the volume's number (image ids are <name>_<slice>)."""
    volume = index["image_id"].str.rsplit("_", n=1).str[0].astype(int)
    return {number: rows.sort_values("slice_index") for number, rows in index.groupby(volume)}


def mask_source(root, **settings) -> VolumeSource:
    return VolumeSource(root / "volumes", masks=root / "masks", mask_labels=settings.pop("mask_labels", {
        1: "epidural", 2: "intraparenchymal", 3: "intraventricular", 4: "subarachnoid", 5: "subdural"}), **settings)


def test_volumes_come_out_in_anatomical_order_with_the_hu_and_labels_of_the_dicom_series(dataset, tmp_path):
    """Whatever the storage order, flips or gantry tilt, slice k of a volume is the phantom's slice k (inferior
    to superior), with its HU and its mask-derived labels, and sits where the DICOM index puts it."""
    root, summary, truth = dataset
    assert summary["tilted"] and any(t["tilted"] for t in truth.values())  # oblique affines are among them
    scaled = nib.load(root / "volumes" / f"{49 + SCALED:03d}.nii").dataobj
    assert (scaled.slope, scaled.inter) == (0.5, -1024.0)  # nibabel keeps the scaling with the data, not the header
    index, _, _ = mask_source(root).index(tmp_path / "cache")
    dicom, _, _ = load_or_build_index(root / "stage_2_train", root / "stage_2_train.csv", read_rsna_labels,
                                      tmp_path / "cache")
    assert len(index) == PATIENTS * SLICES
    for number, rows in by_volume(index).items():
        expected = truth[number]
        assert rows["slice_index"].tolist() == list(range(SLICES)) and (rows["order"] == "position").all()
        for k, path in enumerate(rows["path"]):
            np.testing.assert_allclose(read_hu(path), expected["hu"][k], atol=0.5, err_msg=f"volume {number} slice {k}")
        np.testing.assert_array_equal(rows[list(LABELS)].to_numpy(), expected["labels"], err_msg=f"volume {number}")
        same = dicom[dicom["patient"] == pseudonym(expected["patient"])].sort_values("slice_index")
        np.testing.assert_allclose(rows["position"], same["position"], atol=1e-3)
        # what a checkpoint's training ranges are made of (ich.data.seen) is the DICOM series' too
        np.testing.assert_allclose(rows["field_of_view_mm"], same["field_of_view_mm"], atol=1e-3)
        np.testing.assert_allclose(rows[["head_hu_median", "head_brain_fraction", "brain_noise_hu"]],
                                   same[["head_hu_median", "head_brain_fraction", "brain_noise_hu"]], atol=0.5)
        for nifti_path, dicom_path in zip(rows["path"], same["path"]):
            np.testing.assert_allclose(read_hu(nifti_path), read_hu(dicom_path), atol=0.5)
    assert index["study"].nunique() == PATIENTS and (index.groupby("study")["series"].nunique() == 1).all()


def test_a_ct_ich_style_label_csv_gives_the_dicom_labels(dataset, tmp_path):
    """hemorrhage_diagnosis_raw_ct.csv: PatientNumber 49 names 049.nii, SliceNumber counts the stored slices
    from 1, subtype columns are capitalised, `any` comes from them; the two other columns are ignored."""
    root, _, truth = dataset
    cfg = compose_config("train", ["data=nifti", f"data.root={root}", "data.image_dir=volumes", "task=multilabel",
                                   "data.labels=hemorrhage_diagnosis_raw_ct.csv", "output_dir=unused",
                                   "data.label_columns={PatientNumber: volume, SliceNumber: slice}"])
    dm = ICHDataModule.from_config(cfg, cache_dir=str(tmp_path / "cache"))
    index, summary, _ = dm.build_index()
    assert summary.skipped == {} and len(index) == PATIENTS * SLICES
    for number, rows in by_volume(index).items():
        np.testing.assert_array_equal(rows[list(LABELS)].to_numpy(), truth[number]["labels"], err_msg=str(number))
    # a slice's id carries its stored number, as the CSV counts it: volume 050 is stored superior first
    last = by_volume(index)[50]["image_id"].tolist()
    assert last[0] == f"050_{SLICES:03d}" and last[-1] == "050_001"


def test_masks_give_labels_beyond_min_mask_pixels_through_mask_labels(tmp_path, caplog):
    """Hand-made: slice 0 empty; slice 1 three voxels of 5; slice 2 two voxels of 1 and one of 7 (unmapped)."""
    volume = np.full((4, 4, 3), 30, np.int16)
    mask = np.zeros((4, 4, 3), np.uint8)
    mask[0, :3, 1] = 5
    mask[1, :2, 2], mask[3, 3, 2] = 1, 7
    for folder, data in (("volumes", volume), ("masks", mask)):
        (tmp_path / folder).mkdir()
        nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / folder / "a.nii.gz")
    source = VolumeSource(tmp_path / "volumes", masks=tmp_path / "masks", mask_labels={1: "epidural", 5: "subdural"},
                          min_mask_pixels=2)
    with caplog.at_level(logging.WARNING):
        index, _, _ = source.index(tmp_path / "cache")
    got = index.sort_values("slice_index")[["any", "epidural", "subdural", "intraparenchymal"]].to_numpy().tolist()
    assert got == [[0, 0, 0, 0], [1, 0, 1, 0], [1, 0, 0, 0]]  # slice 2: three voxels > 2; epidural's two are not
    assert "Mask values [7]" in caplog.text
    lenient = VolumeSource(tmp_path / "volumes", masks=tmp_path / "masks", mask_labels={1: "epidural"})
    assert lenient.index(tmp_path / "cache")[0].sort_values("slice_index")["epidural"].tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="data.mask_labels"):
        lenient.check_labels(("any", "subdural"))


def test_hu_are_the_stored_values_through_the_nifti_slope_and_intercept(tmp_path):
    hu = np.array([-1000.0, -100.0, 0.0, 40.0, 80.0, 1000.0, 2500.0, -3024.0], np.float32).reshape(2, 4, 1)
    (tmp_path / "v").mkdir()
    (tmp_path / "m").mkdir()
    nib.save(nib.Nifti1Image(((hu + 1024) * 4).astype(np.int16), np.eye(4)), tmp_path / "v" / "a.nii")
    set_slope_inter(tmp_path / "v" / "a.nii", 0.25, -1024.0)  # stored: (HU + 1024) * 4
    nib.save(nib.Nifti1Image(np.zeros((2, 4, 1), np.uint8), np.eye(4)), tmp_path / "m" / "a.nii")
    index, _, _ = VolumeSource(tmp_path / "v", masks=tmp_path / "m").index(tmp_path / "cache")
    # identity affine: axis 0 runs to the patient's right, axis 1 anterior. Shown as DICOM shows a slice, the
    # anterior end (axis 1 last) is the top row and the patient's left (axis 0 first) the right column; -3024 is air
    expected = [[-1024, 40], [2500, 0], [1000, -100], [80, -1000]]
    np.testing.assert_allclose(read_hu(index["path"][0]), expected, atol=0.5)


def test_unreadable_volumes_and_masks_of_another_shape_are_skipped_and_counted(dataset, tmp_path):
    root, _, _ = dataset
    volumes, masks = tmp_path / "volumes", tmp_path / "masks"
    volumes.mkdir()
    masks.mkdir()
    good = root / "volumes" / "049.nii.gz"
    for name in ("good", "wrongmask", "nomask"):
        (volumes / f"{name}.nii.gz").write_bytes(good.read_bytes())
    (masks / "good.nii.gz").write_bytes((root / "masks" / "049.nii.gz").read_bytes())
    nib.save(nib.Nifti1Image(np.zeros((SIZE, SIZE, SLICES - 1), np.uint8), np.eye(4)), masks / "wrongmask.nii.gz")
    (volumes / "truncated.nii.gz").write_bytes(good.read_bytes()[:2000])
    (masks / "truncated.nii.gz").write_bytes((root / "masks" / "049.nii.gz").read_bytes())
    nib.save(nib.Nifti1Image(np.zeros((SIZE, SIZE, 2, 3), np.int16), np.eye(4)), volumes / "fourd.nii")
    nib.save(nib.Nifti1Image(np.zeros((SIZE, SIZE, 2, 3), np.uint8), np.eye(4)), masks / "fourd.nii")
    (volumes / "notes.txt").write_text("not a volume")
    dm = ICHDataModule(source="nifti", root=str(tmp_path), image_dir="volumes", masks="masks",
                       cache_dir=str(tmp_path / "cache"), image_size=32, num_workers=0, split=(0.0, 0.0, 1.0))
    dm.prepare_data()
    dm.setup()
    assert dm.summary["skipped"] == {"mask_shape": 1, "no_label": 1, "unreadable": 1, "not_volume": 1}
    assert dm.summary["slices"]["test"] == SLICES
    folder = next((tmp_path / "cache").glob("index-volumes-*"))
    skipped = pd.read_csv(folder / "skipped.csv").set_index("image_id")
    assert skipped["skip"].to_dict() == {"wrongmask": "mask_shape", "nomask": "no_label", "truncated": "unreadable",
                                         "fourd": "not_volume"}
    assert "a mask must lie on its volume's voxels" in skipped.loc["wrongmask", "detail"]


def test_a_nifti_source_needs_one_kind_of_labels_and_says_so():
    with pytest.raises(ValueError, match="set exactly one of data.labels=CSV and data.masks=FOLDER"):
        ICHDataModule(source="nifti", root="/data/ct-ich", image_dir="ct_scans")
    with pytest.raises(ValueError, match="data.label_columns maps columns to"):
        ICHDataModule(source="nifti", root="/data", labels="x.csv", label_columns={"PatientNumber": "patient"})


def test_patient_pattern_keeps_one_patients_scans_in_one_split(tmp_path):
    """BHSD names hold the RSNA patient and study: ID_<patient>_ID_<study>; two studies of one patient."""
    (tmp_path / "v").mkdir()
    (tmp_path / "m").mkdir()
    for name in ("ID_2db7ee14_ID_2591d00dfc", "ID_2db7ee14_ID_f27e38fdfd", "ID_05331dc6_ID_47213b7e2e"):
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.int16), np.eye(4)), tmp_path / "v" / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.uint8), np.eye(4)), tmp_path / "m" / f"{name}.nii.gz")
    index, _, _ = VolumeSource(tmp_path / "v", masks=tmp_path / "m", patient_pattern="^(ID_[0-9a-f]+)_").index(tmp_path)
    assert index["study"].nunique() == 3 and index["patient"].nunique() == 2
    assert set(index["patient"]) == {pseudonym("ID_2db7ee14"), pseudonym("ID_05331dc6")}


# --- end to end: training, evaluation, study-level truth ---------------------------------------------------


@pytest.fixture(scope="module")
def volume_run(dataset, tmp_path_factory):
    """`python train.py data=nifti ...` on the phantom's volumes and BHSD-style masks, with context and the slice cache."""
    root, _, _ = dataset
    run_dir = tmp_path_factory.mktemp("train-nifti")
    fast = [o for o in FAST_RUN if not o.startswith("data.phantom")]
    cfg = compose_config("train", [*fast, "data=nifti", f"data.root={root}", "data.image_dir=volumes",
                                   "data.masks=masks", f"data.mask_labels={BHSD_LABELS}", "data.context=1",
                                   "data.cache=true", f"output_dir={run_dir}",
                                   f"data.cache_dir={tmp_path_factory.mktemp('cache')}", "task=multilabel"])
    return run_dir, train(cfg)


@pytest.mark.slow
def test_training_and_evaluation_run_on_volumes(volume_run, tmp_path):
    run_dir, trained = volume_run
    assert {"test/auroc", "test/op_sensitivity", "test/exam_auroc"} <= set(trained)
    split = pd.read_csv(run_dir / "split.csv")
    assert len(split) == PATIENTS * SLICES and split["image_id"].str.fullmatch(r"\d{3}_\d{3}").all()
    cfg = compose_config("evaluate", [f"ckpt_path={run_dir}", f"output_dir={tmp_path}"])
    metrics = evaluate(cfg, [f"ckpt_path={run_dir}"])
    assert metrics["data/slices_test"] == (split["split"] == "test").sum()
    tested = {k: v for k, v in trained.items() if k.startswith("test/") and k != "test/loss"}
    assert {k: metrics[k] for k in tested} == pytest.approx(tested, abs=1e-5, nan_ok=True)


def test_study_labels_take_the_majority_of_the_reads(tmp_path):
    (tmp_path / "reads.csv").write_text("name,Category,R1:ICH,R2:ICH,R3:ICH\n"
                                        "CQ500-CT-0,B1,1,1,0\nCQ500-CT-1,B1,0,1,0\nCQ500-CT-2,B2,1,1,1\n")
    truth = read_study_labels(tmp_path / "reads.csv", "name", ["R1:ICH", "R2:ICH", "R3:ICH"])
    assert truth.to_dict() == {"CQ500-CT-0": 1, "CQ500-CT-1": 0, "CQ500-CT-2": 1}
    with pytest.raises(ValueError, match="set study_id to its study column and study_reads"):
        read_study_labels(tmp_path / "reads.csv", "PatientID", ["R1:ICH"])


@pytest.mark.slow
def test_evaluate_against_study_level_truth(volume_run, dataset, tmp_path):
    """CQ500-style reads.csv for the phantom's DICOM studies: one dissenting read per study, one study absent."""
    run_dir, _ = volume_run
    root, summary, _ = dataset
    labels = read_rsna_labels(root / "stage_2_train.csv").set_index("image_id")["any"]
    rows, truth = [], {}
    for patient, image_ids in summary["series"].items():
        truth[patient] = int(labels.loc[image_ids].max())
        rows.append({"name": patient, "R1:ICH": truth[patient], "R2:ICH": 1 - truth[patient], "R3:ICH": truth[patient]})
    rows.append({"name": "CQ500-CT-999", "R1:ICH": 1, "R2:ICH": 1, "R3:ICH": 1})
    pd.DataFrame(rows).to_csv(tmp_path / "reads.csv", index=False)
    assert 0 < sum(truth.values()) < PATIENTS  # both kinds of study, so the exam AUROC is defined
    overrides = [f"ckpt_path={run_dir}", f"study_labels={tmp_path / 'reads.csv'}",
                 f"study_images={root / 'stage_2_train'}"]
    metrics = evaluate(compose_config("evaluate", [*overrides, f"output_dir={tmp_path / 'out'}"]), overrides)
    assert metrics["data/exams_test"] == PATIENTS and metrics["data/exams_unmatched"] == 1
    assert metrics["data/exams_positive"] == sum(truth.values()) and metrics["data/slices_test"] == PATIENTS * SLICES
    studies = pd.read_csv(tmp_path / "out" / "exams.csv").set_index("study")
    assert studies["truth_any"].to_dict() == {pseudonym(p): t for p, t in truth.items()}
    assert metrics["test/exam_auroc"] == pytest.approx(roc_auc_score(studies["truth_any"], studies["prob_any"]))
    called = studies["prob_any"] >= metrics["test/exam_op_threshold"]
    assert (studies["called_any"] == called).all()
    # the volumes were these very series: every study lies inside what the model saw (ich.data.seen)
    assert (studies["ood"] == 0).all() and metrics["data/exams_ood"] == 0
    assert metrics["test/exam_op_sensitivity"] == pytest.approx(called[studies["truth_any"] == 1].mean())
    assert metrics["test/exam_op_specificity"] == pytest.approx(1 - called[studies["truth_any"] == 0].mean())
    assert metrics["test/exam_auroc_ci_low"] <= metrics["test/exam_auroc"] <= metrics["test/exam_auroc_ci_high"]
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["data/exams_test"] == PATIENTS and not any(p in (tmp_path / "out" / "exams.csv").read_text()
                                                               for p in truth)
