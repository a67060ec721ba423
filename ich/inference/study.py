"""A hospital export as studies and series: which series a study is read on, and why the others are not.

A folder from a PACS is not Kaggle's flat folder of axial slices (see DOMAIN.md, "From slices to a study"):
nested patient/study/series folders, files without `.dcm`, a DICOMDIR, scouts, bone-kernel and thin
reconstructions, coronal reformats, dose reports and screenshots. Only headers are read here (pixels only of an
instance stored twice, to keep a copy that reads), every file lands in a study and series or in a counted, listed
reason, and nothing here is fatal.

Per file, in this order (the first that applies is its reason): `dicomdir`, `not_dicom` (no DICOM at all),
`no_preamble` (a raw dataset, not a DICOM file), `unreadable` (a header that does not parse, or one without
Study/Series Instance UID: truncated), then the reader's own reasons `no_pixel_data` (structured and dose
reports), `not_monochrome` (RGB screenshots), `multi_frame`, `not_ct` (a Modality the model was not trained on),
`localizer` (ImageType LOCALIZER), `not_axial` (a reformat), `duplicate` (another copy of a SOP Instance UID,
whose pixels read). A series keeps its usable files, ordered as the index orders them (ich.data.order); one
left with fewer than `min_slices` is skipped as `too_few_slices`, one whose positions repeat as `perfusion`
(DOMAIN.md, "Studies that fool a series rule"). Of the others, `read_on` says which a study is read on.
"""

import math
import re
import statistics
import tempfile
import zipfile
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pydicom
from pydicom import config
from pydicom.dataset import Dataset
from tqdm.auto import tqdm

from ich.core.privacy import pseudonym
from ich.data.dicom import (CT_ONLY, DicomReadError, admitted_modalities, field_of_view, first_float, read_hu,
                            slice_position, tag_value)
from ich.data.order import slice_order

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage
TOO_FEW_SLICES = "its series has fewer usable slices than min_slices"
# An axial slice's normal points along the patient's z axis; a gantry tilt turns it by up to ~30 degrees, a
# coronal or sagittal reformat by 90. Slices whose normal is more than 35 degrees off z are no axial series.
AXIAL_MIN_COSINE = math.cos(math.radians(35))
PREFERRED_THICKNESS_MM = 5.0  # the thick series radiologists read head CT on, and RSNA's slices
# Reconstruction kernels for bone, lung and edges: the soft-tissue series shows blood, these show fractures.
SHARP_KERNEL_WORDS = ("BONE", "LUNG", "SHARP", "EDGE", "DETAIL", "HIGH")
SHARP_KERNEL_NUMBER = 60  # Siemens names kernels by sharpness: H31s, Hr38 soft; H60s, H70h, Br64 bone
# SeriesDescription words of a contrast series, whole words: CT angiography or venography, post-contrast. POST is
# post-contrast, but not in POST FOSSA (the posterior fossa of a plain split protocol).
CONTRAST_WORDS = re.compile(r"(?<![A-Z0-9])(CTA|CTV|ANGIO[A-Z]*|VENO[A-Z]*|CONTRAST|ENHANCED|C\+|\+C"
                            r"|POST(?![\s._-]*FOSS))(?![A-Z0-9])")
# ...unless it says there is none: W/O CONTRAST, NON-CONTRAST, NO IV CONTRAST, PRE-CONTRAST, NONCON, C-
NO_CONTRAST = re.compile(r"(?<![A-Z0-9])((W/?O|WITHOUT|NON|NO|PRE)[\s/_-]*(IV[\s_-]*)?(CONTRAST|CON|C|ENHANCED)"
                         r"|NONCON[A-Z]*|C-)(?![A-Z0-9])")
NO_AGENT = re.compile(r"^\W*(NONE|NO|N/?A|0)?\W*$")  # ContrastBolusAgent values that name no agent
# BodyPartExamined values (DICOM PS3.16 CID 4031) of a series that images the head; any other names another body part
HEAD_PARTS = frozenset({"", "HEAD", "BRAIN", "SKULL", "HEADNECK", "HEAD NECK"})
# A series joins the reading of its study when less than this share of its span lies in the spans already read
JOIN_OVERLAP = 0.5
# ...and when it meets them: the fossa and cerebrum of a split protocol adjoin or overlap, while a series further
# than this from the head read (a cervical spine in the same study) is another body part, not the rest of the head
JOIN_GAP_MM = 20.0


@dataclass(frozen=True)
class ImageFile:
    """One file's header values that grouping, ordering and choosing a series need, and its reason to be skipped
    ("" when it is a usable axial CT slice)."""

    path: Path
    reason: str = ""
    detail: str = ""  # why, in a sentence without the file's path
    patient_id: str = ""
    study_uid: str = ""
    series_uid: str = ""
    instance_uid: str = ""
    accession: str = ""
    series_number: str = ""
    position: float = math.nan  # mm along the slice normal (ich.data.dicom.slice_position)
    instance: float = math.nan  # InstanceNumber: the order of a series whose positions do not tell slices apart
    thickness: float = math.nan  # SliceThickness, mm
    field_of_view: float = math.nan  # mm (ich.data.dicom.field_of_view)
    kernel: str = ""  # ConvolutionKernel, its values joined by "/"
    description: str = ""  # SeriesDescription
    contrast_agent: str = ""  # ContrastBolusAgent (0018,0010)
    body_part: str = ""  # BodyPartExamined (0018,0015), upper case


@dataclass
class Series:
    """One series of a study: its usable slices in position order, or the reason it is skipped."""

    key: str  # pseudonym of the SeriesInstanceUID
    number: str  # SeriesNumber as stored ("" if missing): how a radiologist finds it, no identifier
    slices: list[ImageFile]  # the usable files, feet to head (ich.data.order.slice_order)
    left_out: list[ImageFile] = field(default_factory=list)  # its files that are not used, each with its reason
    reason: str = ""  # why the whole series is skipped; "" when it is predicted
    order: str = "position"  # what the slice order rests on: position, instance or file (ich.data.order)
    detail: str = ""  # the reason in a sentence

    @property
    def skipped(self) -> Counter:
        """reason -> how many of its files were left out."""
        return Counter(image.reason for image in self.left_out)

    @property
    def thickness(self) -> float:
        """SliceThickness (the median over slices), or the median spacing of the positions when it is missing and
        the positions order the slices."""
        stored = [image.thickness for image in self.slices if not math.isnan(image.thickness)]
        if stored:
            return float(statistics.median(stored))
        if self.order != "position":
            return math.nan
        steps = [b.position - a.position for a, b in zip(self.slices, self.slices[1:])]
        return float(statistics.median(steps)) if steps else math.nan

    @property
    def kernel(self) -> str:
        return self.slices[0].kernel if self.slices else ""

    @property
    def sharp(self) -> bool:
        """A bone, lung or edge-enhancing kernel: the series of the same scan for fractures, not for blood."""
        return sharp_kernel(self.kernel)

    @property
    def contrast(self) -> bool:
        """Contrast given (ContrastBolusAgent) or named (CTA, angio, post-contrast): it looks like blood."""
        tags = {(image.description, image.contrast_agent) for image in self.slices}
        return any(contrast_series(description, agent) for description, agent in tags)

    @property
    def other_part(self) -> str:
        """The BodyPartExamined of a series that says it images something else than the head (CSPINE, CHEST), or
        "" for a head or a series that does not say."""
        parts = {image.body_part for image in self.slices} - HEAD_PARTS
        return sorted(parts)[0] if parts else ""

    @property
    def span(self) -> tuple[float, float]:
        """The first and last slice's position (mm along the normal): the range of the head it covers."""
        positions = [image.position for image in self.slices if not math.isnan(image.position)]
        return (min(positions), max(positions)) if positions else (math.nan, math.nan)

    @property
    def name(self) -> str:
        """`series 3`: how a radiologist finds it (no identifier)."""
        return f"series {self.number}" if self.number else "series (no number)"

    def describe(self) -> str:
        """`series 3: 40 slices, 5 mm, kernel H31s, 0.0 to 195.0 mm`, the words a radiologist finds it by."""
        name = self.name
        if not self.slices:
            return name
        thickness = "" if math.isnan(self.thickness) else f", {self.thickness:g} mm"
        kernel = f", kernel {self.kernel}" if self.kernel else ""
        low, high = self.span
        extent = "" if math.isnan(low) else f", {low:.1f} to {high:.1f} mm"
        contrast = ", contrast" if self.contrast else ""
        part = f", body part {self.other_part}" if self.other_part else ""
        count = f"{len(self.slices)} slice{'' if len(self.slices) == 1 else 's'}"
        return f"{name}: {count}{thickness}{kernel}{extent}{contrast}{part}"


@dataclass
class Study:
    """One study of the folder, its series (predicted or skipped) and who and what it is, privately."""

    key: str  # pseudonym of the StudyInstanceUID: what outputs carry by default
    uid: str  # StudyInstanceUID: only written with keep_ids=true
    accession: str  # AccessionNumber: only written with keep_ids=true
    patient: str  # pseudonym of the PatientID
    series: list[Series]

    @property
    def eligible(self) -> list[Series]:
        return [series for series in self.series if not series.reason]


@dataclass
class Scan:
    """What a folder holds: its studies, and the files that belong to none (not DICOM, unreadable, DICOMDIR)."""

    root: Path
    files: int
    studies: list[Study]
    loose: list[ImageFile]  # files that name no study, each with its reason


def sharp_kernel(kernel: str) -> bool:
    name = kernel.upper()
    if any(word in name for word in SHARP_KERNEL_WORDS):
        return True
    digits = "".join(character if character.isdigit() else " " for character in name).split()
    return bool(digits) and name[:1].isalpha() and int(digits[0]) >= SHARP_KERNEL_NUMBER


def contrast_series(description: str, agent: str) -> bool:
    """A ContrastBolusAgent that names an agent, or a SeriesDescription with a contrast word (CONTRAST_WORDS) and
    no word saying there is none (`HEAD W/O CONTRAST` is a plain series)."""
    description, agent = description.upper(), agent.upper()
    if not NO_AGENT.match(agent) and not NO_CONTRAST.search(agent):
        return True
    return bool(CONTRAST_WORDS.search(description)) and not NO_CONTRAST.search(description)


def choice_key(series: Series) -> tuple:
    """The rule that ranks a study's series, lowest first: the head (or a series that names no body part) before a
    series that names another (a cervical spine of a trauma study can have more slices of the same thickness), then
    plain before contrast (contrast looks like blood in the
    brain window), positions that span a range before positions that do not (files converted from a volume: no
    known geometry), a soft-tissue kernel before a sharp one, then the thickness closest to 5 mm (the thick series
    the model's 5 mm training slices resemble), then the most slices, then the series number."""
    thickness = series.thickness
    off = abs(thickness - PREFERRED_THICKNESS_MM) if not math.isnan(thickness) else math.inf
    low, high = series.span
    return (bool(series.other_part), series.contrast, not high > low, series.sharp, round(off, 2), -len(series.slices),
            _number_order(series.number), series.key)


def read_on(series: list[Series]) -> list[Series]:
    """The series a study is read on, in position order: the first of its eligible `series` by choice_key, then,
    in that order, each further series of the same kind (head or another named body part, plain or contrast, soft or
    sharp kernel) of which less
    than JOIN_OVERLAP (half) of its span lies inside the spans already read, and which starts or ends within
    JOIN_GAP_MM of them. So the posterior fossa and the cerebrum of a split protocol are both read, while a thin,
    bone or mirrored copy of a range already read is an alternative, predicted and listed, and a distant range
    (another body part) is listed too. Positions of one study compare across series: they share the patient frame.
    """
    ranked = sorted(series, key=choice_key)
    read, waiting = ranked[:1], ranked[1:]
    joined = True
    while joined:  # again after each join: a series may meet the reading only through one that joined after it
        joined = False
        for candidate in waiting:
            low, high = candidate.span
            same_kind = (bool(candidate.other_part), candidate.contrast, candidate.sharp) == (
                bool(read[0].other_part), read[0].contrast, read[0].sharp)
            spans = [s.span for s in read]
            gap = min(max(0.0, start - high, low - end) for start, end in spans)
            new_range = _inside(low, high, spans) < JOIN_OVERLAP * (high - low)
            if same_kind and high > low and gap <= JOIN_GAP_MM and new_range:
                read.append(candidate)
                waiting.remove(candidate)
                joined = True
                break
    return sorted(read, key=lambda s: s.span[0])


def covered_mm(series: list[Series]) -> float:
    """How much of the head (mm along the normal) the spans of `series` cover together."""
    return sum(high - low for low, high in _merged([s.span for s in series]))


def _inside(low: float, high: float, spans: list[tuple[float, float]]) -> float:
    """The length of [low, high] that lies inside the union of `spans`."""
    return sum(max(0.0, min(high, end) - max(low, start)) for start, end in _merged(spans))


def _merged(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for low, high in sorted(span for span in spans if not math.isnan(span[0])):
        if merged and low <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return merged


@contextmanager
def input_folder(path: str | Path) -> Iterator[Path]:
    """The folder to scan: `path` itself, or a .zip of one unpacked into a temporary folder for as long as the
    caller reads its files."""
    path = Path(path).expanduser()
    if path.is_dir():
        yield path
        return
    if not path.exists():
        raise FileNotFoundError(f"input={path} does not exist: pass a folder of DICOM files or a .zip of one.")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"input={path} is neither a folder nor a .zip archive: pass a folder of DICOM files or a .zip of one.")
    with tempfile.TemporaryDirectory(prefix="ich-predict-") as folder, zipfile.ZipFile(path) as archive:
        archive.extractall(folder)  # zipfile drops absolute paths and `..`, so nothing lands outside
        yield Path(folder)


def scan_folder(root: Path, min_slices: int, modalities: Sequence[str] = CT_ONLY) -> Scan:
    """Read the header of every file under `root` (any depth, any name) and group them into studies and series.

    `modalities` are the Modality values read as CT: those the model's training data admitted (data.modalities).
    """
    paths = sorted(path for path in root.rglob("*") if path.is_file())
    admitted = admitted_modalities(modalities)
    progress = tqdm(paths, desc="Reading headers", unit="file", mininterval=1.0, disable=len(paths) < 500)
    images = [read_image_header(path, admitted) for path in progress]
    loose = [image for image in images if not image.study_uid]
    return Scan(root=root, files=len(paths), studies=group_studies(images, min_slices), loose=loose)


def group_studies(images: list[ImageFile], min_slices: int) -> list[Study]:
    """The studies of these headers, each with its series, in order of their key; files of no study left out."""
    by_study: dict[str, list[ImageFile]] = {}
    for image in images:
        if image.study_uid:
            by_study.setdefault(image.study_uid, []).append(image)
    studies = [_study(uid, files, min_slices) for uid, files in by_study.items()]
    return sorted(studies, key=lambda study: study.key)


def files_read(paths: list[Path], min_slices: int, modalities: Sequence[str] = CT_ONLY) -> set[Path]:
    """Of these files, the slices of the series their studies are read on (read_on): evaluate.py scores a study
    against study-level truth on what predict.py would read it on, not on scouts, bone copies or perfusion.
    `modalities` as in scan_folder."""
    admitted = admitted_modalities(modalities)
    studies = group_studies([read_image_header(Path(path), admitted) for path in paths], min_slices)
    return {image.path for study in studies for series in read_on(study.eligible) for image in series.slices}


def _study(uid: str, files: list[ImageFile], min_slices: int) -> Study:
    by_series: dict[str, list[ImageFile]] = {}
    for image in files:
        by_series.setdefault(image.series_uid, []).append(image)
    series = [_series(series_uid, members, min_slices) for series_uid, members in by_series.items()]
    for one in series:
        repeats = "" if one.reason else repeated_positions(one)
        if repeats:
            one.reason, one.detail = "perfusion", repeats
    series.sort(key=lambda s: (bool(s.reason), _number_order(s.number), s.key))
    first = files[0]
    return Study(key=pseudonym(uid), uid=uid, accession=first.accession, patient=pseudonym(first.patient_id),
                 series=series)


def _series(uid: str, files: list[ImageFile], min_slices: int) -> Series:
    left_out = [image for image in files if image.reason]
    copies: dict[str, list[ImageFile]] = {}
    for image in files:
        if not image.reason:
            copies.setdefault(image.instance_uid or str(image.path), []).append(image)
    usable = []
    for group in copies.values():
        kept = group[0] if len(group) == 1 else next((image for image in group if _reads(image.path)), group[0])
        usable.append(kept)
        left_out += [replace(image, reason="duplicate", detail="another copy of an instance that is read")
                     for image in group if image is not kept]
    order, source = slice_order(np.array([image.position for image in usable]),
                                np.array([image.instance for image in usable]), [str(image.path) for image in usable])
    number = next((image.series_number for image in files if image.series_number), "")
    series = Series(key=pseudonym(uid), number=number, slices=[usable[i] for i in order], left_out=left_out,
                    order=source)
    if not usable:
        series.reason = ", ".join(reason for reason, _ in series.skipped.most_common())
    elif len(usable) < min_slices:
        series.reason, series.detail = "too_few_slices", TOO_FEW_SLICES
    return series


def _reads(path: Path) -> bool:
    """Whether a file's pixels decode: of several copies of one instance, the one kept is one that does."""
    try:
        read_hu(path)
    except DicomReadError:
        return False
    return True


def repeated_positions(series: Series) -> str:
    """Why a series whose positions repeat is no volume ("" when they do not): a perfusion or dynamic series
    scans one slab again and again, so its neighbours in position order are the same place at other times. It is
    one when more than half of its positions hold several slices; a slice sent twice is no time series."""
    counts = Counter(round(image.position, 2) for image in series.slices if not math.isnan(image.position))
    if len(counts) < 2 or 2 * sum(count > 1 for count in counts.values()) <= len(counts):
        return ""  # one position for all is no order (a converted volume); a few repeats, slices sent twice
    times = set(counts.values())
    shape = (f"{len(counts)} positions x {times.pop()} time points" if len(times) == 1 else
             f"{sum(counts.values())} slices at {len(counts)} positions")
    return f"positions repeat: {shape}, a perfusion or dynamic series, not a volume"


def _number_order(number: str) -> tuple[float, str]:
    value = first_float(number)
    return (value if not math.isnan(value) else math.inf), number


# --- one file's header --------------------------------------------------------------------------------


def read_image_header(path: Path, modalities: frozenset[str] = frozenset(CT_ONLY)) -> ImageFile:
    """The header of one file, pixels left on disk; a file that is no usable axial CT slice gets its reason.

    `modalities` are the Modality values read as CT, upper case."""
    if path.name.upper() == "DICOMDIR":
        return ImageFile(path, "dicomdir", "the folder's DICOMDIR index, not an image")
    try:
        with path.open("rb") as file:
            preamble = file.read(132)[128:] == b"DICM"
    except OSError as err:
        return ImageFile(path, "unreadable", f"cannot be opened ({err.strerror or type(err).__name__})")
    try:
        # RSNA-style `ID_...` UIDs fail value validation; the values are parsed here, as ich.data.dicom does
        with config.disable_value_validation():
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=not preamble)
            return _classify(path, ds, preamble, modalities)
    except Exception as err:  # a parser fed arbitrary bytes fails in many ways; each means the same here
        if not preamble:
            return ImageFile(path, "not_dicom", "not a DICOM file")
        why = " ".join(str(err).replace(str(path), "the file").split())[:160] or type(err).__name__
        return ImageFile(path, "unreadable", f"a header that cannot be parsed ({why})")


def _classify(path: Path, ds: Dataset, preamble: bool, modalities: frozenset[str]) -> ImageFile:
    meta_class = str(ds.file_meta.get("MediaStorageSOPClassUID", "")) if hasattr(ds, "file_meta") else ""
    if meta_class == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds:
        return ImageFile(path, "dicomdir", "a DICOMDIR index, not an image")
    study, series = str(ds.get("StudyInstanceUID", "")).strip(), str(ds.get("SeriesInstanceUID", "")).strip()
    if not preamble:
        if not study and "SOPClassUID" not in ds:
            return ImageFile(path, "not_dicom", "not a DICOM file")
        return ImageFile(path, "no_preamble", "a raw DICOM dataset without the DICM preamble: export it as DICOM "
                                              "files (Part 10) to have it read")
    if not study or not series:
        # both are required in every image and report: a file without them is truncated or broken
        return ImageFile(path, "unreadable", "no StudyInstanceUID or SeriesInstanceUID (a truncated or broken file)")
    known = dict(
        path=path, patient_id=str(ds.get("PatientID", "")), study_uid=study, series_uid=series,
        instance_uid=str(ds.get("SOPInstanceUID", "")), accession=str(ds.get("AccessionNumber", "")),
        series_number=str(ds.get("SeriesNumber", "") or ""),
    )
    reason, detail = _unusable(ds, modalities)
    if reason:
        return ImageFile(reason=reason, detail=detail, **known)
    kernel = "/".join(str(value).strip() for value in _values(ds.get("ConvolutionKernel")))
    return ImageFile(position=slice_position(ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")),
                     instance=first_float(ds.get("InstanceNumber")), thickness=first_float(ds.get("SliceThickness")),
                     field_of_view=field_of_view(ds.get("PixelSpacing"), int(tag_value(ds, "Rows", 0) or 0),
                                                 int(tag_value(ds, "Columns", 0) or 0)),
                     kernel=kernel, description=str(ds.get("SeriesDescription", "") or "").strip(),
                     contrast_agent=str(ds.get("ContrastBolusAgent", "") or "").strip(),
                     body_part=str(ds.get("BodyPartExamined", "") or "").strip().upper(), **known)


def _unusable(ds: Dataset, modalities: frozenset[str]) -> tuple[str, str]:
    """(reason, detail) when the file is no axial CT slice to predict on, ("", "") when it is one."""
    rows, columns = int(tag_value(ds, "Rows", 0) or 0), int(tag_value(ds, "Columns", 0) or 0)
    modality = str(tag_value(ds, "Modality") or "CT").strip().upper()  # absent: CT, as ich.data.dicom reads it
    if rows <= 0 or columns <= 0:
        return "no_pixel_data", f"no image: a {modality} object without pixels (a report)"
    samples = int(tag_value(ds, "SamplesPerPixel", 1) or 1)
    photometric = str(tag_value(ds, "PhotometricInterpretation", "")).strip()
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return "not_monochrome", f"{photometric or 'colour'} pixels, {samples} samples per pixel (a screenshot)"
    frames = int(first_float(tag_value(ds, "NumberOfFrames", 1) or 1))
    if frames > 1:
        return "multi_frame", f"{frames} frames in one file, not one CT slice"
    if modality not in modalities:
        return "not_ct", f"a {modality} image, not {'/'.join(sorted(modalities))}"
    image_type = [str(value).upper() for value in _values(ds.get("ImageType"))]
    if "LOCALIZER" in image_type:
        return "localizer", "a localizer (scout) image"
    # the z component of the unit slice normal: the position (0, 0, 1) projected on the normal (nan without
    # ImageOrientationPatient: such a series is read in InstanceNumber or file order, as the index reads it)
    normal_z = slice_position((0.0, 0.0, 1.0), ds.get("ImageOrientationPatient"))
    if abs(normal_z) < AXIAL_MIN_COSINE:
        tilt = math.degrees(math.acos(min(1.0, abs(normal_z))))
        return "not_axial", f"slices {tilt:.0f} degrees off axial (a coronal or sagittal reformat)"
    return "", ""


def _values(value: object) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        return value.split("\\")
    return list(value) if hasattr(value, "__iter__") else [value]
