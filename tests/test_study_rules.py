"""Which series answer a study: perfusion is no volume, contrast comes after plain, a split protocol is read on
both of its ranges, one failing study does not stop the others, and evaluate.py reads a study as predict.py does.

The studies are written here with plain pydicom from the phantom's HU slices, so the expected choices below are
stated by hand from what each series is, not derived from ich.inference.study.
"""

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

import ich.inference.answer
from conftest import FAST_RUN, compose_config, one_thread
from ich.core.privacy import pseudonym
from ich.data.phantom import plan_patients, render_series
from ich.evaluate import run as evaluate
from ich.inference.study import ImageFile, Series, choice_key, contrast_series, read_on, repeated_positions, scan_folder
from ich.predict import run as predict_run
from ich.train import run as train

# Its module fixtures train a model and predict once; under pytest-xdist (`--dist loadgroup`) the module stays on
# one worker so that they are not built again on another.

SIZE = 64
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
MIRRORED = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # row x column points to the feet: positions project negated
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
PLAIN_Z = [-17.5 + 5.0 * k for k in range(8)]  # symmetric about 0, so a mirrored copy spans the same range
FOSSA_Z = [-47.5, -45.0, -42.5, -40.0]  # the posterior fossa at 2.5 mm, below the cerebrum
CEREBRUM_Z = [-30.0 + 5.0 * k for k in range(8)]


# --- studies written with plain pydicom ------------------------------------------------------------------------


class StudyWriter:
    """Writes the slices of one study (one patient) as a scanner would, series by series."""

    def __init__(self, root: Path, name: str):
        self.root, self.name = root / name, name
        self.patient, self.study = f"PAT-{name}", generate_uid()
        self.uids: dict[str, str] = {}  # series number -> SeriesInstanceUID

    def series(self, number: str, slices: list[np.ndarray], z: list[float], thickness: float, kernel: str = "H31s",
               orientation: tuple = AXIAL, image_type: str = "AXIAL", **tags) -> None:
        uid = self.uids[number] = generate_uid()
        for k, (hu, position) in enumerate(zip(slices, z)):
            ds = Dataset()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CTImageStorage
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.Modality, ds.PatientID, ds.PatientName = "CT", self.patient, f"Rules^{self.name}"
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber = self.study, uid, number
            ds.InstanceNumber = k + 1
            ds.ImageType = ["ORIGINAL", "PRIMARY", image_type]
            ds.ImageOrientationPatient = list(orientation)
            # the image's corner in the patient frame (LPS); for an axial slice z is its place in the head
            ds.ImagePositionPatient = [-120.0, -120.0, position] if orientation != CORONAL else [-120.0, position, 60.0]
            ds.PixelSpacing, ds.SliceThickness, ds.ConvolutionKernel = [3.75, 3.75], thickness, kernel
            ds.Rows = ds.Columns = SIZE
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
            ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
            ds.WindowCenter, ds.WindowWidth = 40, 80
            ds.PixelData = (np.asarray(hu) + 1024).astype(np.int16).tobytes()
            for keyword, value in tags.items():
                setattr(ds, keyword, value)
            path = self.root / f"SE{number}" / f"IM{k:04d}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=True)


def phantom_heads() -> tuple[np.ndarray, list[np.ndarray]]:
    """HU of 8 slices of 64 px: one phantom head that bleeds on its slices 2 to 5, and heads without blood."""
    bleeding, clean = None, []
    for patient in plan_patients(12, 8, SIZE, seed=5):
        hu, mask = render_series(patient, SIZE)
        blood = (mask > 0).sum(axis=(1, 2))
        if not blood.any():
            clean.append(hu)
        elif bleeding is None and (blood[2:6] > 40).all():
            bleeding = hu
    assert bleeding is not None and len(clean) >= 4
    return bleeding, clean


def write_studies(root: Path) -> dict[str, StudyWriter]:
    """Four studies: a stroke work-up with every kind of series, a split protocol that bleeds in the posterior
    fossa only, a CT angiogram alone, and a plain head (which the failure test breaks)."""
    bleeding, clean = phantom_heads()
    stroke, split, angio, plain = (StudyWriter(root, name) for name in ("stroke", "split", "angio", "plain"))
    head = list(clean[0])
    stroke.series("1", head[3:5], [0.0, 0.0], 1.0, image_type="LOCALIZER")
    stroke.series("2", head, PLAIN_Z, 5.0)  # the plain 5 mm soft-tissue series: what the study is read on
    thin_z = [PLAIN_Z[0] + 0.625 * k for k in range(57)]  # 0.625 mm over the same 35 mm
    stroke.series("3", [head[min(7, round((z - PLAIN_Z[0]) / 5))] for z in thin_z], thin_z, 0.625)
    stroke.series("4", head, PLAIN_Z, 5.0, kernel="H70h")  # its bone-kernel copy
    # a CT angiogram, 5 mm and longer than the plain series (on the old rule it won)
    stroke.series("5", [head[0]] * 4 + head, [-37.5, -32.5, -27.5, -22.5, *PLAIN_Z], 5.0, ContrastBolusAgent="Iohexol",
                  SeriesDescription="CTA HEAD")
    # perfusion: 8 positions scanned 20 times, 160 "slices" (on the old rule the longest 5 mm series won)
    stroke.series("6", [head[k % 8] for k in range(160)], [PLAIN_Z[k % 8] for k in range(160)], 5.0,
                  SeriesDescription="PERFUSION", AcquisitionNumber=1)
    stroke.series("7", head[::-1], PLAIN_Z, 5.0, orientation=MIRRORED)  # a mirrored copy of the same range
    stroke.series("8", head[:6], [-30.0 + 5 * k for k in range(6)], 3.0, orientation=CORONAL)  # a reformat
    stroke.series("9", head + head[:2], [0.0] * 10, 5.0)  # converted files: one position for all, instances 1-10
    split.series("2", list(bleeding[2:6]), FOSSA_Z, 2.5, SeriesDescription="POST FOSSA 2.5")
    split.series("3", list(clean[1]), CEREBRUM_Z, 5.0, SeriesDescription="CEREBRUM 5")
    angio.series("1", list(clean[2][3:5]), [0.0, 0.0], 1.0, image_type="LOCALIZER")
    angio.series("4", list(clean[2]), PLAIN_Z, 5.0, SeriesDescription="CTA HEAD", ContrastBolusAgent="Iohexol")
    plain.series("2", list(clean[3]), PLAIN_Z, 5.0)
    return {"stroke": stroke, "split": split, "angio": angio, "plain": plain}


def numbered(series: list[Series]) -> list[str]:
    return [one.number for one in series]


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("studies")
    return root, write_studies(root)


@pytest.fixture(scope="module")
def scanned(studies):
    root, written = studies
    by_key = {study.key: study for study in scan_folder(root, min_slices=4).studies}
    return {name: by_key[pseudonym(writer.study)] for name, writer in written.items()}


# --- fast: the rule on series, and on the written studies' headers ------------------------------------------------


def fake_series(number: str, z: list[float], thickness: float, kernel: str = "H31s", agent: str = "",
                description: str = "", body_part: str = "") -> Series:
    images = [ImageFile(path=Path(f"{number}-{k}"), position=p, thickness=thickness, kernel=kernel,
                        contrast_agent=agent, description=description, body_part=body_part) for k, p in enumerate(z)]
    return Series(key=number, number=number, slices=images)


def test_a_perfusion_series_is_skipped_with_its_reason_and_the_plain_series_is_read(scanned):
    stroke = scanned["stroke"]
    reasons = {series.number: series.reason for series in stroke.series}
    assert reasons == {"1": "localizer", "2": "", "3": "", "4": "", "5": "", "6": "perfusion", "7": "",
                       "8": "not_axial", "9": ""}
    perfusion = next(series for series in stroke.series if series.number == "6")
    assert perfusion.detail == ("positions repeat: 8 positions x 20 time points, a perfusion or dynamic series, "
                                "not a volume")
    assert numbered(read_on(stroke.eligible)) == ["2"]
    ranked = numbered(sorted(stroke.eligible, key=choice_key))
    assert ranked.index("2") < ranked.index("9")  # converted files without positions never before the plain series
    assert ranked[-1] == "5"  # the angiogram after every plain series


def test_a_slice_sent_twice_is_no_perfusion_series_but_a_slab_scanned_twice_is():
    sent_twice = fake_series("2", [5.0 * k for k in range(10)] + [15.0], 5.0)
    assert repeated_positions(sent_twice) == ""
    two_times = fake_series("3", [5.0 * (k % 4) for k in range(8)], 5.0)
    assert repeated_positions(two_times) == ("positions repeat: 4 positions x 2 time points, a perfusion or dynamic "
                                             "series, not a volume")


def test_contrast_series_rank_after_every_plain_series():
    cta = fake_series("2", [5.0 * k for k in range(40)], 5.0, agent="Omnipaque 350")  # soft, 5 mm, the longest
    post = fake_series("3", [5.0 * k for k in range(30)], 5.0, description="HEAD C+")
    plain_bone = fake_series("4", [5.0 * k for k in range(30)], 5.0, kernel="BONE")
    plain_thin = fake_series("5", [0.625 * k for k in range(240)], 0.625, description="HEAD W/O CONTRAST")
    assert numbered(sorted([cta, post, plain_bone, plain_thin], key=choice_key)) == ["5", "4", "2", "3"]
    assert numbered(read_on([cta, post])) == ["2"]  # a study with only contrast series is read on one of them


@pytest.mark.parametrize(("description", "agent", "contrast"), [
    ("CTA HEAD", "", True), ("CT ANGIO 0.625", "", True), ("HEAD C+", "", True), ("POST CONTRAST 5MM", "", True),
    ("HEAD POST", "", True), ("AX 5MM", "Iohexol", True), ("HEAD W/O CONTRAST", "", False),
    ("NON-CONTRAST HEAD", "", False), ("PRE CONTRAST", "", False), ("POST FOSSA 2.5", "", False),
    ("POSTERIOR FOSSA", "", False), ("AX 5MM", "NONE", False), ("CONTRASTING WINDOWS", "", False),
])
def test_contrast_is_told_by_the_agent_tag_or_the_description_words(description, agent, contrast):
    assert contrast_series(description, agent) == contrast


def test_a_cervical_spine_of_the_same_study_is_never_read_for_the_head_even_with_more_slices():
    """A trauma study: the head (30 x 5 mm, 0 to 145 mm) and the cervical spine (50 x 5 mm, -240 to 5 mm, reaching
    into the skull base) in one soft kernel. By slices alone the spine would win; by position it adjoins the head."""
    head = fake_series("2", [5.0 * k for k in range(30)], 5.0, body_part="HEAD")
    spine = fake_series("3", [-240.0 + 5.0 * k for k in range(50)], 5.0, body_part="CSPINE")
    unlabelled = fake_series("4", [5.0 * k for k in range(30)], 5.0)
    assert numbered(read_on([spine, head])) == ["2"]
    assert numbered(read_on([spine, unlabelled])) == ["4"]  # a head that names no part still comes first
    assert numbered(read_on([spine])) == ["3"]  # nothing else: read, and its description says what it is
    assert spine.describe() == "series 3: 50 slices, 5 mm, kernel H31s, -240.0 to 5.0 mm, body part CSPINE"
    assert head.other_part == "" and fake_series("5", [0.0, 5.0], 5.0, body_part="HEADNECK").other_part == ""


def test_a_split_protocol_is_read_on_both_ranges_and_copies_of_a_range_are_alternatives():
    cerebrum = fake_series("3", [5.0 * k for k in range(20)], 5.0)  # 0 to 95 mm
    fossa = fake_series("2", [-40.0 + 2.5 * k for k in range(16)], 2.5)  # -40 to -2.5 mm
    thin = fake_series("4", [-40.0 + 0.625 * k for k in range(217)], 0.625)  # the whole head again
    bone = fake_series("5", [5.0 * k for k in range(20)], 5.0, kernel="H70h")
    vertex = fake_series("6", [80.0 + 3.0 * k for k in range(10)], 3.0)  # 80 to 107: 15 of its 27 mm already read
    low = fake_series("7", [-60.0 + 3.0 * k for k in range(10)], 3.0)  # -60 to -33, then the fossa: 7 of 37.5 mm
    assert numbered(read_on([thin, bone, cerebrum, fossa, vertex])) == ["2", "3"]  # in position order
    assert numbered(read_on([cerebrum, fossa, low])) == ["7", "2", "3"]
    spine = fake_series("8", [-200.0 + 5.0 * k for k in range(16)], 5.0)  # -200 to -125 mm: 85 mm below the fossa
    assert numbered(read_on([cerebrum, fossa, spine])) == ["2", "3"]


def test_the_written_split_protocol_is_read_on_its_fossa_and_its_cerebrum(scanned):
    assert numbered(read_on(scanned["split"].eligible)) == ["2", "3"]
    assert numbered(read_on(scanned["angio"].eligible)) == ["4"]


# --- slow: predict.py and evaluate.py with a trained model ------------------------------------------------------


@pytest.fixture(scope="module")
def trained(cache_dir, tmp_path_factory):
    """A run folder of a tiny model trained on phantom DICOMs (64 px, one slice of context on each side)."""
    path = tmp_path_factory.mktemp("train")
    quick = [o for o in FAST_RUN if not o.startswith(("data.phantom.", "trainer.max_epochs", "data.batch_size"))]
    with one_thread():
        train(compose_config("train", [*quick, f"output_dir={path}", f"data.cache_dir={cache_dir}", "data.context=1",
                                       "data.phantom.patients=80", "data.phantom.slices=8", "data.phantom.size=64",
                                       "data.batch_size=16", "optimizer.lr=0.003", "trainer.max_epochs=8",
                                       "trainer.precision=32-true", "test=false", "task.operating_point=youden"]))
    return path


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def prediction(trained, studies, tmp_path_factory):
    """predict.py over the four studies, the plain study's pixel decoder crashing with a path and a UID."""
    root, written = studies
    output_dir = tmp_path_factory.mktemp("predict")
    broken = written["plain"].root
    read = ich.inference.answer.read_hu

    def crashing(path):
        if broken in Path(path).parents:
            raise RuntimeError(f"decoder crashed on {path} of study {written['plain'].study}")
        return read(path)

    handler = Lines()
    logging.getLogger("ich.predict").addHandler(handler)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(ich.inference.answer, "read_hu", crashing)
            cfg = compose_config("predict", [f"ckpt_path={trained}", f"input={root}", f"output_dir={output_dir}",
                                             "min_slices=4"])
            predict_run(cfg)
    finally:
        logging.getLogger("ich.predict").removeHandler(handler)
    studies_csv = pd.read_csv(output_dir / "studies.csv", dtype={"failed": str}).fillna({"failed": ""})
    series_csv = pd.read_csv(output_dir / "series.csv", dtype={"number": str, "reason": str}).fillna({"reason": ""})
    studies_csv = studies_csv.set_index("study")
    return output_dir, studies_csv, series_csv, handler.lines


def roles(series_csv: pd.DataFrame, writer: StudyWriter) -> dict[str, tuple[str, str]]:
    mine = series_csv[series_csv["study"] == pseudonym(writer.study)]
    return {row.number: (row.role, row.reason) for row in mine.itertuples()}


@pytest.mark.slow
def test_a_split_protocol_that_bleeds_in_the_fossa_alone_is_read_on_both_and_called_positive(studies, prediction):
    _, written = studies
    output_dir, studies_csv, series_csv, _ = prediction
    split = studies_csv.loc[pseudonym(written["split"].study)]
    assert roles(series_csv, written["split"]) == {"2": ("used", ""), "3": ("used", "")}
    mine = series_csv[series_csv["study"] == pseudonym(written["split"].study)].set_index("number")
    # the model sees the bleed in the fossa and none in the cerebrum, so only reading both finds it
    assert mine.loc["2", "prob_any"] >= split["threshold_any"] > mine.loc["3", "prob_any"]
    assert split["positive"] == 1 and split["slices"] == 4 + 8
    assert split["prob_any"] == pytest.approx(mine["prob_any"].max())
    assert split["covered_mm"] == pytest.approx(7.5 + 35.0)  # -47.5 to -40 and -30 to 5
    assert "-47.5 to -40.0 mm" in split["series"] and "-30.0 to 5.0 mm" in split["series"]
    assert "covering 42.5 mm" in (output_dir / "report.html").read_text()


@pytest.mark.slow
def test_perfusion_is_never_read_and_a_study_with_only_contrast_says_so(studies, prediction):
    _, written = studies
    output_dir, studies_csv, series_csv, _ = prediction
    assert roles(series_csv, written["stroke"]) == {
        "1": ("skipped", "localizer"), "2": ("used", ""), "3": ("predicted", ""), "4": ("predicted", ""),
        "5": ("predicted", ""), "6": ("skipped", "perfusion"), "7": ("predicted", ""), "8": ("skipped", "not_axial"),
        "9": ("predicted", "")}
    stroke = studies_csv.loc[pseudonym(written["stroke"].study)]
    assert stroke["contrast"] == 0 and stroke["slices"] == 8 and "8 positions x 20 time points" in stroke["skipped"]
    angio = studies_csv.loc[pseudonym(written["angio"].study)]
    assert angio["contrast"] == 1 and "contrast series" in angio["verdict"] and angio["slices"] == 8
    assert "This study has no plain series" in (output_dir / "report.html").read_text()


@pytest.mark.slow
def test_a_study_that_fails_is_listed_with_its_reason_and_the_others_are_written(studies, prediction):
    _, written = studies
    output_dir, studies_csv, series_csv, lines = prediction
    assert len(studies_csv) == 4
    plain = studies_csv.loc[pseudonym(written["plain"].study)]
    assert plain["failed"].startswith("RuntimeError: decoder crashed on <path> of study <uid>")
    assert plain["verdict"] == f"failed: {plain['failed']}" and plain["slices"] == 0
    assert roles(series_csv, written["plain"]) == {"2": ("failed", "")}
    others = studies_csv.drop(index=pseudonym(written["plain"].study))
    assert (others["failed"] == "").all() and (others["slices"] > 0).all()
    failures = [line for line in lines if "failed" in line]
    assert len(failures) == 1 and "\n" not in failures[0]
    assert str(written["plain"].root.parent) not in failures[0] and written["plain"].study not in failures[0]
    assert "RuntimeError: decoder crashed" in (output_dir / "report.html").read_text()


@pytest.mark.slow
def test_evaluate_scores_each_study_on_the_series_predict_reads_it_on(trained, studies, prediction, tmp_path):
    root, written = studies
    _, predicted, _, _ = prediction
    truth = {"stroke": 0, "split": 1, "angio": 0, "plain": 0}
    pd.DataFrame([{"name": written[name].patient, "R1:ICH": t, "R2:ICH": t, "R3:ICH": t} for name, t in truth.items()]
                 ).to_csv(tmp_path / "reads.csv", index=False)
    overrides = [f"ckpt_path={trained}", f"study_labels={tmp_path / 'reads.csv'}", f"study_images={root}",
                 "precision=32-true", "bootstrap=20"]
    metrics = evaluate(compose_config("evaluate", [*overrides, f"output_dir={tmp_path / 'out'}"]), overrides)
    # stroke: its plain series (8); split: fossa and cerebrum (4 + 8); angio: its angiogram (8); plain: 8
    assert metrics["data/slices_test"] == 8 + 12 + 8 + 8 and metrics["data/exams_test"] == 4
    scores = pd.read_csv(tmp_path / "out" / "exams.csv").set_index("study")["prob_any"]
    for name in ("stroke", "split", "angio"):  # the plain study failed in predict.py on purpose
        expected = predicted.loc[pseudonym(written[name].study), "prob_any"]
        assert scores[pseudonym(written[name].patient)] == pytest.approx(expected, abs=1e-3)
