"""A study's answer as DICOM objects that a PACS files with its images: a Comprehensive SR and Secondary Capture
images of the most suspicious slices, built with highdicom.

Both carry the input's StudyInstanceUID and its patient and study attributes (highdicom copies them from the
referenced images), in new series with new UIDs under `serve.uid_root`. The SR says what predict.py says of the
study: what the model was trained on (first, after the notice), the finding, whether the study lies outside what the
model saw in training, each output's exam probability against its threshold, the operating point, the series read
and its range, and the model; a later answer to the same study names the one it replaces.
"""

import json
from dataclasses import dataclass

import cv2
import highdicom as hd
import numpy as np
import pydicom
from pydicom import config
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from ich import __version__
from ich.core.results import file_digest
from ich.data.seen import flag
from ich.evaluation.operating import called
from ich.inference.answer import Predictor, StudyResult, verdict
from ich.inference.deploy import description_path
from ich.inference.outputs import Outputs
from ich.inference.study import covered_mm

NOTICE = "RESEARCH USE ONLY - NOT FOR DIAGNOSIS"
NOTICE_TEXT = ("Research use only, not for diagnosis: written by the ich research tool, not a medical device. Every "
               "finding needs a radiologist.")
MANUFACTURER = "ich"
SR_SERIES_NUMBER = 9900  # + the answer's number: the node's series sort after the scanner's
SC_SERIES_NUMBER = 9950
SC_MIN_WIDTH = 512  # the slice and its map are enlarged to at least this width, so the burned-in label reads
UUID_ROOT = "2.25"  # UIDs made of a UUID (ISO/IEC 9834-8), valid without a registered root
# The patient and study attributes of PS3.3 that are Type 2 (present, maybe empty) and that highdicom copies from
# the input into the results
TYPE_2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                 "ReferringPhysicianName", "StudyID", "AccessionNumber")


def code(value: str, meaning: str) -> Code:
    """A concept of this node's own coding scheme (99ICH: the 99 prefix marks a private scheme in DICOM). Values
    fit CodeValue's 16 characters (SH), where viewers look; longer ones would go to LongCodeValue."""
    if len(value) > 16:
        raise ValueError(f"code value {value} is longer than CodeValue's 16 characters: shorten it.")
    return Code(value, "99ICH", meaning)


RESULT = code("ICH-RESULT", "Intracranial hemorrhage AI result")
FINDING = Code("121071", "DCM", "Finding")
HEMORRHAGE = Code("50960005", "SCT", "Hemorrhage")
NO_HEMORRHAGE = code("NO-ICH", "No hemorrhage found")
POSITIVE = code("POSITIVE", "Study called positive")
YES, NO = Code("373066001", "SCT", "Yes"), Code("373067005", "SCT", "No")
OUTPUT = code("OUTPUT", "Model output")
OUTPUT_NAME = code("OUTPUT-NAME", "Output name")
PROBABILITY = code("PROBABILITY", "Exam probability")
THRESHOLD = code("THRESHOLD", "Threshold")
CALLED = code("CALLED", "At or above threshold")
OPERATING_POINT = code("OPERATING-POINT", "Operating point")
CHOSEN = code("OP-CHOSEN", "Operating point chosen on validation")
SERIES_READ = code("SERIES-READ", "Series read")
SERIES_UID = Code("112002", "DCM", "Series Instance UID")
DESCRIPTION = code("SERIES-DESC", "Series description")
FROM_MM, TO_MM = code("FROM-MM", "Range start"), code("TO-MM", "Range end")
COVERED_MM = code("COVERED-MM", "Range read")
MODEL = code("MODEL", "Model")
ALGORITHM_NAME, ALGORITHM_VERSION = Code("111001", "DCM", "Algorithm Name"), Code("111003", "DCM", "Algorithm Version")
BACKBONE = code("BACKBONE", "Backbone")
CHECKPOINT = code("CKPT-SHA256", "Checkpoint SHA-256")
TASK = code("TASK", "Task")
REPLACES = code("REPLACES", "Replaces the result series")
NOTICE_CODE = code("NOTICE", "Notice")
TRAINING_SOURCE = code("TRAINING-SOURCE", "Training source")
OUT_OF_DISTRIBUTION = code("OOD", "Out of distribution")
UNITLESS, MM = Code("1", "UCUM", "no units"), Code("mm", "UCUM", "millimeter")


@dataclass(frozen=True)
class ModelIdentity:
    """What the SR says made the answer: read once when the node loads its model."""

    backbone: str
    sha256: str
    task: str
    version: str = __version__


def model_identity(model: Predictor) -> ModelIdentity:
    """The backbone from the checkpoint (or the exported file's JSON) and the checksum of the file read."""
    if model.module is not None:
        backbone = str(model.module.model.hparams.backbone)
    else:
        backbone = str(json.loads(description_path(model.source).read_text()).get("backbone", "unknown"))
    return ModelIdentity(backbone=backbone, sha256=file_digest(str(model.source)), task=model.task)


def new_uid(root: str) -> str:
    """A new UID under `root`; under 2.25 one made of a random UUID, as that root requires."""
    return generate_uid(prefix=None) if root == UUID_ROOT else generate_uid(prefix=f"{root}.")


def contains(item: Dataset, children: list[Dataset]) -> Dataset:
    item.ContentSequence = hd.sr.ContentSequence(children)
    return item


def yes_no(value: bool) -> Code:
    return YES if value else NO


def sr_content(result: StudyResult, model: Predictor, outputs: Outputs, about: ModelIdentity,
               replaces: str | None) -> Dataset:
    """The SR's content tree: notice, what the model was trained on, finding, whether the study lies outside what
    it saw in training, outputs, operating point, series read, model, what it replaces."""
    exam, thresholds = result.exam, outputs.exam_thresholds
    text, positive = verdict(model.labels, model.task, exam, thresholds)
    finding = HEMORRHAGE if positive else NO_HEMORRHAGE
    ood, reason = flag([(r.series.name, r.figures) for r in result.read], model.inputs)
    items = [
        hd.sr.TextContentItem(NOTICE_CODE, NOTICE_TEXT, relationship_type="CONTAINS"),
        hd.sr.TextContentItem(TRAINING_SOURCE, outputs.source.text, relationship_type="CONTAINS"),
        hd.sr.CodeContentItem(FINDING, finding, relationship_type="CONTAINS"),
        hd.sr.TextContentItem(code("VERDICT", "Verdict"), text, relationship_type="CONTAINS"),
        hd.sr.CodeContentItem(POSITIVE, yes_no(positive), relationship_type="CONTAINS"),
        hd.sr.TextContentItem(OUT_OF_DISTRIBUTION, {1: f"yes: {reason}", 0: "no: inside every training range"}.get(
            ood, reason), relationship_type="CONTAINS"),
    ]
    for label, probability, threshold in zip(model.labels, exam, thresholds):
        items.append(contains(hd.sr.ContainerContentItem(OUTPUT, relationship_type="CONTAINS"), [
            hd.sr.TextContentItem(OUTPUT_NAME, label, relationship_type="CONTAINS"),
            hd.sr.NumContentItem(PROBABILITY, float(probability), UNITLESS, relationship_type="CONTAINS"),
            hd.sr.NumContentItem(THRESHOLD, float(threshold), UNITLESS, relationship_type="CONTAINS"),
            hd.sr.CodeContentItem(CALLED, yes_no(bool(called(probability, threshold))), relationship_type="CONTAINS"),
        ]))
    items += [
        hd.sr.TextContentItem(OPERATING_POINT, outputs.operating_point(), relationship_type="CONTAINS"),
        hd.sr.CodeContentItem(CHOSEN, yes_no(model.thresholds_chosen), relationship_type="CONTAINS"),
    ]
    for read in result.read:
        low, high = read.series.span
        items.append(contains(hd.sr.ContainerContentItem(SERIES_READ, relationship_type="CONTAINS"), [
            hd.sr.UIDRefContentItem(SERIES_UID, read.series.slices[0].series_uid, relationship_type="CONTAINS"),
            hd.sr.TextContentItem(DESCRIPTION, read.series.describe(), relationship_type="CONTAINS"),
            hd.sr.NumContentItem(FROM_MM, float(low), MM, relationship_type="CONTAINS"),
            hd.sr.NumContentItem(TO_MM, float(high), MM, relationship_type="CONTAINS"),
        ]))
    covered = covered_mm([r.series for r in result.read])
    items.append(hd.sr.NumContentItem(COVERED_MM, float(covered), MM, relationship_type="CONTAINS"))
    items.append(contains(hd.sr.ContainerContentItem(MODEL, relationship_type="CONTAINS"), [
        hd.sr.TextContentItem(ALGORITHM_NAME, f"ich {about.backbone}", relationship_type="CONTAINS"),
        hd.sr.TextContentItem(ALGORITHM_VERSION, about.version, relationship_type="CONTAINS"),
        hd.sr.TextContentItem(BACKBONE, about.backbone, relationship_type="CONTAINS"),
        hd.sr.TextContentItem(TASK, about.task, relationship_type="CONTAINS"),
        hd.sr.TextContentItem(CHECKPOINT, about.sha256, relationship_type="CONTAINS"),
    ]))
    if replaces:
        items.append(hd.sr.UIDRefContentItem(REPLACES, replaces, relationship_type="CONTAINS"))
    return contains(hd.sr.ContainerContentItem(RESULT), items)


def burned_label(image: np.ndarray, lines: list[str]) -> np.ndarray:
    """The slice and its heat map enlarged to SC_MIN_WIDTH, with `lines` written in white on black below."""
    scale = max(1.0, SC_MIN_WIDTH / image.shape[1])
    image = cv2.resize(image, (round(image.shape[1] * scale), round(image.shape[0] * scale)),
                       interpolation=cv2.INTER_LINEAR)
    line_px = 22
    banner = np.zeros((line_px * len(lines) + 8, image.shape[1], 3), np.uint8)
    for row, line in enumerate(lines):
        ascii_line = line.encode("ascii", "replace").decode()  # OpenCV's fonts draw ASCII only
        cv2.putText(banner, ascii_line, (6, line_px * (row + 1)), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1,
                    cv2.LINE_AA)
    return np.ascontiguousarray(np.concatenate([image, banner], axis=0))


def answer_datasets(result: StudyResult, model: Predictor, outputs: Outputs, tiles: list[tuple[np.ndarray, str]],
                    about: ModelIdentity, uid_root: str, number: int, previous: Dataset | None) -> dict[str, Dataset]:
    """The SR (sr.dcm) and one Secondary Capture per heat-map tile (sc-<k>.dcm) of a study read; `previous` is
    the SR of the answer this one replaces."""
    with config.disable_value_validation():  # input headers are taken as they come (ich.data.dicom reads them so)
        evidence = [pydicom.dcmread(image.path, stop_before_pixels=True)
                    for read in result.read for image in read.series.slices]
    for ds in evidence:  # Type 2 (required, may be empty) attributes some scanners leave out; highdicom copies them
        for keyword in TYPE_2_COPIED:
            if keyword not in ds:
                setattr(ds, keyword, "")
    replaces = str(previous.SeriesInstanceUID) if previous is not None else None
    sr = hd.sr.ComprehensiveSR(
        evidence=evidence, content=sr_content(result, model, outputs, about, replaces),
        series_instance_uid=new_uid(uid_root), series_number=SR_SERIES_NUMBER + number,
        sop_instance_uid=new_uid(uid_root), instance_number=1, manufacturer=MANUFACTURER, is_complete=True,
        previous_versions=[previous] if previous is not None else None, transfer_syntax_uid=ExplicitVRLittleEndian)
    sr.SeriesDescription = f"ich result {number}: {NOTICE.lower()}"[:64]
    datasets = {"sr.dcm": sr}
    text, _ = verdict(model.labels, model.task, result.exam, outputs.exam_thresholds)
    series_uid = new_uid(uid_root)
    for k, (image, caption) in enumerate(tiles, start=1):
        pixels = burned_label(image, [NOTICE, f"ich: {text}", *caption.splitlines(), "left: brain window; right: "
                                                                                     "Grad-CAM heat map"])
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=evidence[0], pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8,
            coordinate_system="PATIENT", patient_orientation=("L", "P"), series_instance_uid=series_uid,
            series_number=SC_SERIES_NUMBER + number, sop_instance_uid=new_uid(uid_root), instance_number=k,
            manufacturer=MANUFACTURER, transfer_syntax_uid=ExplicitVRLittleEndian)
        sc.BurnedInAnnotation = "YES"
        sc.SeriesDescription = f"ich heat maps {number}: {NOTICE.lower()}"[:64]
        sc.ImageComments = NOTICE_TEXT
        datasets[f"sc-{k:02d}.dcm"] = sc
    return datasets
