"""predict.py on a hospital-style export: every file where it belongs, the right verdicts, no identifiers, a report.

The export is written here with plain pydicom, independently of ich.inference.study: phantom series and pydicom's real CT
files in nested patient/study/series folders without file extensions, with a localizer, a bone-kernel copy, a
coronal reformat, a structured report, an RGB screenshot, a DICOMDIR, a text file and truncated files.
"""

import base64
import re
import shutil
import zipfile
from copy import deepcopy

import matplotlib.image
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom import config
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from conftest import FAST_RUN, compose_config, one_thread, open_in_chromium
from ich.core.privacy import pseudonym
from ich.data.phantom import generate
from ich.export import export as export_file
from ich.inference.answer import verdict
from ich.inference.study import ImageFile, Series, choice_key, input_folder, scan_folder, sharp_kernel
from ich.predict import run as predict_run
from ich.train import run as train

# Its module fixtures train or write the data once; under pytest-xdist (`--dist loadfile`) the module
# stays on one worker so that they are not built again on another.

IDENTIFYING = ("PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID", "SeriesInstanceUID",
               "SOPInstanceUID", "AccessionNumber")
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
PHANTOM_SLICES = 10
CT_SMALL_COPIES = 5


# --- the export, written with plain pydicom ---------------------------------------------------------------


def save(ds: Dataset, path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with config.disable_value_validation():  # the phantom's RSNA-style `ID_...` UIDs are invalid on purpose
        ds.save_as(path, enforce_file_format=True)


def copy_of(ds: Dataset, **changes) -> Dataset:
    copy = deepcopy(ds)  # a shallow copy would share its elements: setting a value would change the original
    copy.SOPInstanceUID = copy.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword, value in changes.items():
        setattr(copy, keyword, value)
    return copy


def non_image(modality: str, sop_class: str, study: Dataset, **tags) -> Dataset:
    """A dataset of `study`'s patient and study that is no CT slice: a report, a screenshot."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID", "AccessionNumber"):
        setattr(ds, keyword, getattr(study, keyword))
    ds.SeriesInstanceUID, ds.Modality = generate_uid(), modality
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


def write_export(root, phantom_dir, seed: int) -> dict:
    """A PACS-style export of 4 phantom patients and pydicom's CT files; returns what each file is."""
    summary = generate(phantom_dir, patients=4, slices=PHANTOM_SLICES, size=64, seed=seed, quirks=False)
    labels = pd.read_csv(phantom_dir / "stage_2_train.csv")
    positive = set(labels.loc[labels["ID"].str.endswith("_any") & (labels["Label"] == 1), "ID"].str[:-4])
    truth, series_of = {}, {}
    rng = np.random.default_rng(seed)
    for p, (patient_id, image_ids) in enumerate(summary["series"].items()):
        slices = [pydicom.dcmread(phantom_dir / "stage_2_train" / f"{image_id}.dcm") for image_id in image_ids]
        study = slices[0]
        truth[study.StudyInstanceUID] = any(image_id in positive for image_id in image_ids)
        folder = root / patient_id / f"ST{p}"  # patient folders named by PatientID, as many exports do
        for k, ds in zip(rng.permutation(len(slices)), slices):  # file names say nothing of slice order
            ds.SeriesNumber, ds.AccessionNumber = 2, f"ACC-{seed}-{p:04d}"
            ds.ImageType, ds.ConvolutionKernel = ["ORIGINAL", "PRIMARY", "AXIAL"], "H31s"
            save(ds, folder / "SE2" / f"IM{k:05d}")
        series_of[study.SeriesInstanceUID] = ("used", "")
        if p == 0:  # the first study has everything else a scanner adds
            localizer = generate_uid()
            for k in range(2):
                save(copy_of(slices[k], SeriesInstanceUID=localizer, SeriesNumber=1,
                             ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]), folder / "SE1" / f"IM{k:05d}")
            bone = generate_uid()
            for k, ds in enumerate(slices):
                save(copy_of(ds, SeriesInstanceUID=bone, SeriesNumber=3, ConvolutionKernel="H70h"),
                     folder / "SE3" / f"IM{k:05d}")
            coronal = generate_uid()
            for k, ds in enumerate(slices[:6]):
                save(copy_of(ds, SeriesInstanceUID=coronal, SeriesNumber=4,
                             ImageOrientationPatient=[1, 0, 0, 0, 0, -1]), folder / "SE4" / f"IM{k:05d}")
            report = non_image("SR", BASIC_TEXT_SR, study, SeriesNumber=99, ContentDate="20261201")
            save(report, folder / "SE99" / "IM00000")
            rgb = np.zeros((32, 32, 3), np.uint8)
            rgb[8:24, 8:24] = (200, 30, 30)
            screenshot = non_image("OT", SECONDARY_CAPTURE, study, SeriesNumber=100, Rows=32, Columns=32,
                                   SamplesPerPixel=3, PhotometricInterpretation="RGB", PlanarConfiguration=0,
                                   BitsAllocated=8, BitsStored=8, HighBit=7, PixelRepresentation=0,
                                   PixelData=rgb.tobytes())
            save(screenshot, folder / "SE100" / "IM00000")
            # a slice cut short in its pixel data: the header reads, the pixels do not
            cut = folder / "SE2" / "IM99999"
            save(copy_of(slices[3]), cut)
            cut.write_bytes(cut.read_bytes()[:-5000])
            series_of.update({localizer: ("skipped", "localizer"), bone: ("predicted", ""),
                              coronal: ("skipped", "not_axial"), report.SeriesInstanceUID: ("skipped", "no_pixel_data"),
                              screenshot.SeriesInstanceUID: ("skipped", "not_monochrome")})
    # pydicom's real CT slice as a 5-slice series 5 mm apart, and a real head CT slice alone
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ct_series = generate_uid()
    for k in range(CT_SMALL_COPIES):
        position = [float(v) for v in ct.ImagePositionPatient]
        save(copy_of(ct, SeriesInstanceUID=ct_series, AccessionNumber="ACC-CT-0001",
                     ImagePositionPatient=[*position[:2], position[2] + 5.0 * k]),
             root / "real" / "ct_small" / f"{k}")
    series_of[ct_series] = ("used", "")
    head = pydicom.dcmread(get_testdata_file("J2K_pixelrep_mismatch.dcm"))
    save(head, root / "real" / "head" / "1")
    series_of[head.SeriesInstanceUID] = ("skipped", "too_few_slices")
    # files of no study: a text file, a DICOMDIR, a file cut inside its header
    (root / "README.txt").write_text("Exported 2026-12-01 from PACS, 5 studies.\n")
    directory = Dataset()
    directory.file_meta = FileMetaDataset()
    directory.file_meta.MediaStorageSOPClassUID = DICOMDIR_CLASS
    directory.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    directory.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    directory.FileSetID, directory.DirectoryRecordSequence = "EXPORT", []
    save(directory, root / "DICOMDIR")
    (root / "broken").write_bytes((root / "real" / "ct_small" / "0").read_bytes()[:400])
    return {"truth": truth, "series": series_of, "loose": {"README.txt": "not_dicom", "DICOMDIR": "dicomdir",
                                                           "broken": "unreadable"}}


def identifying_values(root) -> set[str]:
    """Every identifying value of every DICOM of the export, read with plain pydicom."""
    values = set()
    for path in root.rglob("*"):
        if not path.is_file():
            continue
        try:
            with config.disable_value_validation():
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                values |= {str(ds.get(keyword, "")) for keyword in IDENTIFYING}
        except Exception:  # the text file and the broken file hold no values to protect
            continue
    return {value for value in values if len(value) >= 4}


def readable_text(path) -> str:
    """A written file as searchable text; report.html's inline PNGs decoded, so base64 cannot hide or fake a value."""
    data = path.read_bytes()
    if path.suffix != ".html":
        return data.decode("latin-1")
    text = data.decode("utf-8")
    images = re.findall(r"data:image/png;base64,([^\"]+)", text)
    return re.sub(r"data:image/png;base64,[^\"]+", "", text) + "".join(
        base64.b64decode(image).decode("latin-1") for image in images)


# --- a trained model and the prediction ------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(cache_dir, tmp_path_factory):
    """A run folder of a tiny model trained on phantom DICOMs with one slice of context on each side."""
    path = tmp_path_factory.mktemp("train")
    # enough to read the phantom's 4 test studies right: 40 patients, 8 epochs at a higher rate, float32 (faster here)
    quick = [o for o in FAST_RUN if not o.startswith(("data.phantom.", "trainer.max_epochs", "data.batch_size"))]
    cfg = compose_config("train", [*quick, f"output_dir={path}", f"data.cache_dir={cache_dir}", "data.context=1",
                                   "data.phantom.patients=80", "data.phantom.slices=8", "data.phantom.size=64",
                                   "data.batch_size=16", "optimizer.lr=0.003", "trainer.max_epochs=8",
                                   "trainer.precision=32-true", "test=false"])
    with one_thread():
        train(cfg)
    return path


def predict(checkpoint, input_path, output_dir, *overrides):
    cfg = compose_config("predict", [f"ckpt_path={checkpoint}", f"input={input_path}", f"output_dir={output_dir}",
                                     "min_slices=4", *overrides])
    return predict_run(cfg)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    with config.disable_value_validation():  # the phantom's RSNA-style `ID_...` UIDs are invalid on purpose
        return root, write_export(root, tmp_path_factory.mktemp("phantom"), seed=11)


@pytest.fixture(scope="module")
def prediction(trained, export, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("predict")
    return output_dir, predict(trained, export[0], output_dir)


# --- fast: the rule, and the scan alone ----------------------------------------------------------------------


def test_a_study_is_read_on_its_soft_tissue_series_closest_to_5_mm_then_the_longest():
    def series(number: str, kernel: str, thickness: float, slices: int) -> Series:
        images = [ImageFile(path=None, position=k * thickness, thickness=thickness, kernel=kernel) for k in range(slices)]
        return Series(key=number, number=number, slices=images)

    candidates = [series("2", "H70h", 5.0, 40), series("3", "H31s", 0.625, 240), series("4", "H31s", 5.0, 36),
                  series("5", "STANDARD", 5.0, 38), series("6", "BONEPLUS", 5.0, 40)]
    assert [s.number for s in sorted(candidates, key=choice_key)] == ["5", "4", "3", "2", "6"]
    assert [sharp_kernel(k) for k in ("H31s", "Hr38", "H70h", "Br64", "BONE", "STANDARD", "SOFT", "FC26")] == [
        False, False, True, True, True, False, False, False]


def test_the_scan_puts_each_file_where_it_belongs_with_its_reason(export):
    root, expected = export
    scan = scan_folder(root, min_slices=4)
    reasons = {image.path.name: image.reason for image in scan.loose}
    assert reasons == expected["loose"]
    assert scan.files == sum(1 for path in root.rglob("*") if path.is_file())
    found = {series.key: series.reason for study in scan.studies for series in study.series}
    wanted = {pseudonym(uid): reason for uid, (role, reason) in expected["series"].items()}
    assert found == wanted


# --- slow: predict.py end to end ---------------------------------------------------------------------------


@pytest.mark.slow
def test_each_series_is_used_predicted_or_skipped_with_its_reason(export, prediction):
    output_dir, _ = prediction
    series = pd.read_csv(output_dir / "series.csv", dtype={"reason": str}).fillna({"reason": ""})
    got = {row.series: (row.role, row.reason) for row in series.itertuples()}
    assert got == {pseudonym(uid): value for uid, value in export[1]["series"].items()}
    skipped = pd.read_csv(output_dir / "skipped_files.csv")
    counts = skipped["reason"].value_counts().to_dict()
    assert counts == {"localizer": 2, "not_axial": 6, "no_pixel_data": 1, "not_monochrome": 1, "bad_pixel_data": 1,
                      "too_few_slices": 1, "not_dicom": 1, "dicomdir": 1, "unreadable": 1}


@pytest.mark.slow
def test_phantom_studies_get_the_right_verdicts_and_the_bone_copy_is_listed(export, prediction):
    output_dir, studies = prediction
    studies = studies.set_index("study")
    for uid, bleeds in export[1]["truth"].items():
        row = studies.loc[pseudonym(uid)]
        assert row["positive"] == int(bleeds), (row["verdict"], row["prob_any"], row["threshold_any"])
        assert row["slices"] == PHANTOM_SLICES  # the truncated copy of a slice is left out, listed
    first = studies.loc[pseudonym(next(iter(export[1]["truth"])))]
    assert "kernel H31s" in first["series"] and "kernel H70h" in first["other_series"]
    assert "localizer" in first["skipped"] and "not_axial" in first["skipped"]
    assert studies["operating_point"].eq("chosen on the validation patients").all()


@pytest.mark.slow
def test_slices_are_listed_in_position_order_with_a_probability_each(export, prediction):
    output_dir, studies = prediction
    slices = pd.read_csv(output_dir / "slices.csv")
    assert list(slices.columns) == ["study", "series", "used", "rank", "position_mm", "prob_any"]
    for (study, series), group in slices.groupby(["study", "series"], sort=False):
        assert group["rank"].tolist() == list(range(1, len(group) + 1))
        assert np.all(np.diff(group["position_mm"]) > 0)
    exams = slices[slices["used"] == 1].groupby("study")["prob_any"].max()  # an exam: its highest slice
    written = pd.read_csv(output_dir / "studies.csv").set_index("study")
    assert exams.to_dict() == written.loc[exams.index, "prob_any"].to_dict()
    assert len(slices[slices["used"] == 1]) == 4 * PHANTOM_SLICES + CT_SMALL_COPIES


@pytest.mark.slow
def test_no_output_file_holds_an_identifying_value_by_default(export, prediction):
    output_dir, _ = prediction
    values = identifying_values(export[0])
    assert len(values) > 20
    written = [path for path in output_dir.rglob("*") if path.is_file()]
    assert {"studies.csv", "slices.csv", "series.csv", "skipped_files.csv", "report.html"} <= {p.name for p in written}
    leaks = {path.name: [value for value in values if value in readable_text(path)] for path in written}
    assert not any(leaks.values()), {name: found for name, found in leaks.items() if found}


@pytest.mark.slow
def test_positive_studies_get_heat_maps_of_their_most_suspicious_slices(export, prediction):
    output_dir, studies = prediction
    maps = sorted((output_dir / "heatmaps").glob("*.png"))
    positive = studies[studies["positive"] == 1]
    assert len(maps) == 3 * len(positive) and len(positive) >= 1
    for study in positive["study"]:
        mine = [path for path in maps if path.name.startswith(study)]
        assert len(mine) == 3
        image = matplotlib.image.imread(mine[0])
        assert image.shape[1] > 2 * image.shape[0]  # the plain slice beside its overlay
        left, right = image[:, : image.shape[0], :3], image[:, -image.shape[0]:, :3]
        assert np.abs(left - right).max() > 0.2  # the overlay colours the slice somewhere


@pytest.mark.slow
def test_the_report_opens_in_chromium_and_shows_every_study(prediction, tmp_path):
    output_dir, studies = prediction
    page = (output_dir / "report.html").read_text(encoding="utf-8")
    for outside in ("http://", "https://", 'src="/', "<script"):
        assert outside not in page
    assert all(f'id="study-{study}"' in page for study in studies["study"])
    assert "Most suspicious slices" in page and "not_axial" in page
    screenshot, widths = open_in_chromium(output_dir / "report.html", tmp_path)
    assert widths and all(width > 0 for width in widths)
    assert matplotlib.image.imread(screenshot).std() > 0.05
    shutil.copy(screenshot, output_dir.parent / "predict-report-screenshot.png")


@pytest.mark.slow
def test_keep_ids_writes_the_study_uid_and_accession_from_a_zip(trained, export, tmp_path):
    root = export[0]
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for path in (root / "real" / "ct_small").iterdir():
            bundle.write(path, f"export/{path.name}")
    studies = predict(trained, archive, tmp_path / "out", "keep_ids=true")
    ct = pydicom.dcmread(root / "real" / "ct_small" / "0")
    assert studies["study_uid"].tolist() == [ct.StudyInstanceUID]
    written = pd.read_csv(tmp_path / "out" / "studies.csv", dtype=str)
    assert written.loc[0, "study_uid"] == ct.StudyInstanceUID
    assert written.loc[0, "accession"] == "ACC-CT-0001"
    assert int(written.loc[0, "slices"]) == CT_SMALL_COPIES


def test_an_input_that_is_neither_a_folder_nor_a_zip_is_refused_in_one_sentence(tmp_path):
    not_zip = tmp_path / "scan.tar"
    not_zip.write_bytes(b"not an archive")
    with pytest.raises(ValueError, match="neither a folder nor a .zip archive"):
        with input_folder(not_zip):
            pass
    with pytest.raises(FileNotFoundError, match="does not exist"):
        with input_folder(tmp_path / "missing"):
            pass


def test_the_verdict_follows_any_at_its_threshold_and_names_the_subtypes_called():
    labels = ("any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")
    thresholds = np.array([0.6, 0.5, 0.5, 0.5, 0.5, 0.3])
    assert verdict(labels, "multilabel", np.array([0.9, 0.1, 0.7, 0.2, 0.1, 0.3]), thresholds) == (
        "hemorrhage: intraparenchymal, subdural", True)  # 0.3 reaches subdural's threshold 0.3
    assert verdict(labels, "multilabel", np.array([0.59, 0.1, 0.1, 0.1, 0.1, 0.4]), thresholds) == (
        "no hemorrhage by `any`; subdural above threshold", False)
    assert verdict(("subdural",), "binary", np.array([0.2]), np.array([0.5])) == ("no subdural", False)


@pytest.mark.slow
def test_an_exported_onnx_file_predicts_the_same_studies_without_heat_maps(trained, export, prediction, tmp_path):
    output_dir, studies = prediction
    onnx = export_file(trained, "onnx", tmp_path / "model.onnx")
    exported = predict(onnx, export[0], tmp_path / "out").set_index("study")
    studies = studies.set_index("study")
    assert exported["verdict"].to_dict() == studies["verdict"].to_dict()
    read = studies["slices"] > 0
    assert np.allclose(exported.loc[read, "prob_any"], studies.loc[read, "prob_any"], atol=1e-4)
    assert not list((tmp_path / "out" / "heatmaps").iterdir())
    assert "No heat maps: model.onnx is an exported model" in (tmp_path / "out" / "report.html").read_text()


@pytest.mark.slow
def test_a_stage_two_run_reads_each_series_in_order_and_gives_its_exam_score(trained, export, cache_dir, tmp_path):
    quick = [o for o in FAST_RUN if not o.startswith(("model=", "data.phantom.", "trainer.max_epochs"))]
    stage_two = tmp_path / "two"
    train(compose_config("train", [*quick, "model=sequence", f"model.encoder={trained}", "trainer.max_epochs=3",
                                   f"output_dir={stage_two}", f"data.cache_dir={cache_dir}", "test=false"]))
    studies = predict(stage_two, export[0], tmp_path / "out").set_index("study")
    for uid in export[1]["truth"]:
        assert studies.loc[pseudonym(uid), "slices"] == PHANTOM_SLICES
    slices = pd.read_csv(tmp_path / "out" / "slices.csv")
    assert slices["prob_any"].between(0, 1).all() and len(slices) == 5 * PHANTOM_SLICES + CT_SMALL_COPIES
    assert "the sequence model&#x27;s exam output" in (tmp_path / "out" / "report.html").read_text()


def test_without_a_checkpoint_or_input_the_error_names_the_option(tmp_path):
    with pytest.raises(ValueError, match=r"predict.py needs ckpt_path=PATH"):
        predict_run(compose_config("predict", [f"output_dir={tmp_path}"]))
    with pytest.raises(ValueError, match=r"predict.py needs input=PATH"):
        predict_run(compose_config("predict", [f"ckpt_path={tmp_path}", f"output_dir={tmp_path}"]))


@pytest.mark.slow
def test_a_checkpoint_that_does_not_say_which_modalities_it_read_is_refused_in_one_sentence(trained, export, tmp_path):
    import torch

    from ich.core.runs import best_checkpoint

    checkpoint = torch.load(best_checkpoint(trained), map_location="cpu", weights_only=True)
    del checkpoint["hyper_parameters"]["inputs"]["modalities"]  # as checkpoints written before it was recorded
    older = tmp_path / "older.ckpt"
    torch.save(checkpoint, older)
    with pytest.raises(ValueError, match="does not say which DICOM modalities and slices its training read"):
        predict(older, export[0], tmp_path / "out")
