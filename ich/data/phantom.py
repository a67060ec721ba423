"""A synthetic head-CT phantom written as real DICOM files in the Kaggle RSNA 2019 layout.

Every path of `ich` (reader, index, training, evaluation) must run offline, so the phantom is the
default dataset: `stage_2_train.csv` plus one `stage_2_train/ID_<hex>.dcm` per slice, read through the
very same RSNA reader as the real download. It carries what a reader must get right (tilted
gantries, no InstanceNumber, invalid `ID_...` UIDs, padding outside the field of view) and, with
`quirks=True`, a few files with the RSNA quirks of DOMAIN.md, listed by id in the returned summary.

Anatomy is drawn in the head's own frame, in mm: `u` left-right, `v` anterior-posterior (posterior
positive, i.e. down the image), `w` along the slice normal. The DICOM geometry only places that frame
in patient space, so a tilted series is the same head as an upright one.

Every file comes from one scanner of one hospital, a `Site` of SITES: site A is the phantom as it always was,
sites B and C image the same kind of heads on other scanners (noise, reconstruction kernel, field of view, slice
thickness, gantry tilt, beam hardening) and, at B, in another population (older, less dense bleeds): B is another
hospital in every respect, C the same population on another scanner. Training on one site and testing on another
is the site-shift test bed (`python -m ich.site_shift`).

`python -m ich.phantom` writes it anywhere.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from pydicom import config, dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from tqdm import tqdm

from ich.core.tasks import LABELS, SUBTYPES
from ich.data.windows import Window

SLICE_MM = 5.0  # distance between slice centres at every site: the heads are the same, only the scanners differ
POSITIVE_PATIENTS = 0.55  # share of patients with any hemorrhage
PADDED_PATIENTS = 1 / 3  # share of series padded outside the circular field of view
MIN_BLOOD_PIXELS = 5  # a bleed is drawn and labelled on a slice only when it covers this many pixels
MIN_BLOOD_MM2 = 10.0  # ... and at least this area
CSV_LABEL_ORDER = (*SUBTYPES, "any")  # the order of the six rows of an image in Kaggle's file
DUPLICATED_IMAGES = 3  # images whose six CSV rows appear twice
# How many files get each per-file quirk; the 12-bit wrap takes one whole series, as a scanner would.
FILE_QUIRKS = {
    "unreadable": 1,
    "monochrome1": 2,
    "no_rescale": 2,
    "non_square": 1,
    "window_multivalue": 2,
    "window_zero_padded": 2,
    "window_non_integer": 1,
}
QUIRK_KINDS = ("wrap_12bit", *FILE_QUIRKS, "duplicate_rows")
# Mask value of each subtype in render_series: 1 + its place in SUBTYPES, as BHSD's masks number them.
MASK_VALUES = {subtype: value for value, subtype in enumerate(SUBTYPES, start=1)}


@dataclass(frozen=True)
class Site:
    """One scanner and its hospital: what they make of the same heads. Every field is measurable in the written
    DICOMs (tests/test_phantom.py measures them from the files)."""

    name: str
    noise: tuple[float, float]  # standard deviation of the image noise in uniform tissue, HU, drawn per patient
    kernel: str  # reconstruction kernel: "drawn" (edges as drawn, white noise), "smooth" or "sharp"
    kernel_mm: float  # Gaussian sigma of the smoothing, or of the unsharp mask that sharpens, mm
    fields_of_view: tuple[float, ...]  # reconstruction diameters, mm; pixel spacing = field of view / size
    thickness: float  # SliceThickness, mm (the tag; each slice is drawn as one plane at every site)
    tilted: float  # share of series acquired with a tilted gantry
    tilt: tuple[float, float]  # their tilt, degrees
    bleed_hu: tuple[float, float] | None  # blood density range, HU; None: acute, as drawn per subtype (55-80 HU)
    beam_hardening: float  # HU added to the brain at the skull's inner table, fading inwards over BEAM_HARDENING_MM


SHARPEN = 2.0  # weight of the unsharp mask of a sharp kernel: image + SHARPEN * (image - blurred image)
BEAM_HARDENING_MM = 5.0  # depth over which an uncorrected beam-hardening rim fades (exponentially)
# The sites, from textbook ranges of clinical head CT rather than from one vendor's sheet: noise SD of 3-6 HU in
# brain for a standard-dose soft-tissue kernel, roughly doubled at half the dose or with a sharp kernel (noise goes
# as 1/sqrt(dose) and rises with kernel sharpness); display fields of view of 200-250 mm for an adult head; axial
# slices 5 mm thick, with 2.5-3 mm thin reconstructions; gantry tilts of 10-25 degrees along the orbitomeatal line
# on step-and-shoot scanners, none on helical ones; acute hematoma 60-80 HU, isodense 30-50 HU after one to two
# weeks; a hyperdense rim of a few HU under the skull where beam-hardening correction is incomplete.
SITES: dict[str, Site] = {
    # the phantom as it always was: its files are byte for byte those written before sites existed
    "A": Site("A", noise=(3.0, 6.0), kernel="drawn", kernel_mm=0.0, fields_of_view=(230.0, 240.0, 250.0),
              thickness=5.0, tilted=1 / 3, tilt=(11.0, 15.0), bleed_hu=None, beam_hardening=0.0),
    # another hospital: an older step-and-shoot scanner with a smooth kernel, every series tilted, and patients who
    # come days late (until 2026-12-06 this profile was site C, and C's was B's)
    "B": Site("B", noise=(2.0, 4.0), kernel="smooth", kernel_mm=0.7, fields_of_view=(250.0, 260.0, 280.0),
              thickness=5.0, tilted=1.0, tilt=(18.0, 22.0), bleed_hu=(30.0, 50.0), beam_hardening=6.0),
    # the same population on another vendor's helical scanner at a lower dose: a sharp kernel, a tight field of view,
    # thin slices, no tilt
    "C": Site("C", noise=(8.0, 12.0), kernel="sharp", kernel_mm=0.5, fields_of_view=(210.0, 220.0),
              thickness=2.5, tilted=0.0, tilt=(0.0, 0.0), bleed_hu=None, beam_hardening=4.0),
}
ACUTE_HU = (55.0, 80.0)  # the range the subtypes' blood densities are drawn from, mapped onto a site's bleed_hu


def get_site(name: str) -> Site:
    """The Site of a name of SITES (data.phantom.site, `python -m ich.phantom --site`)."""
    if name not in SITES:
        raise ValueError(f"Unknown phantom site {name!r}: choose one of {', '.join(SITES)} (data.phantom.site).")
    return SITES[name]


@dataclass(frozen=True)
class Head:
    """One patient's anatomy; sizes in mm at the widest slice, intensities in HU."""

    a: float  # outer skull semi-axis, left-right
    b: float  # outer skull semi-axis, anterior-posterior
    height: float  # half height of the skull ellipsoid along w
    skull: float  # skull thickness at the vertex; the skull base is thicker
    scalp: float
    cu: float  # head centre, offset from the image centre
    cv: float
    bone: float  # bone density factor
    grey: float
    white: float
    csf: float
    noise: float  # standard deviation of the Gaussian noise
    sulci: int  # sulci around the convexity
    sulcus_phase: float
    sulcus_warp: float
    vent_w: float  # centre of the lateral ventricles along w
    vent_half: float  # their half extent along w
    vent_sep: float  # distance of each ventricle from the midline
    vent_v: float  # their centre, anterior-posterior
    vent_a: float  # half width
    vent_b: float  # half length
    vent_rot: float  # the posterior ends splay outwards by this angle
    vent_bend: float  # how far their ends curve outwards, mm
    cistern_v: float  # centre of the basal cistern ring


@dataclass(frozen=True)
class Bleed:
    """One hemorrhage, a 3D blob spanning `w0 - half .. w0 + half` along the slice normal."""

    subtype: str
    w0: float
    half: float
    hu: float
    theta: float  # where it sits, as an angle around the head (0 = patient's left, pi/2 = posterior)
    spread: float  # angular half width of skull-side and sulcal bleeds, rad
    size: float  # thickness (epidural, subdural), line half width (subarachnoid) or radius (others), mm
    place: float  # radius of an intraparenchymal centre as a share of the brain; fill of a ventricle
    aspect: float
    angle: float
    kind: str = ""  # subarachnoid: "sulcal" or "basal"; intraventricular: "left", "right" or "both"


@dataclass(frozen=True)
class Patient:
    """One patient and its one series, decided before any pixel is drawn."""

    seed: int
    index: int
    patient_id: str
    study_uid: str
    series_uid: str
    image_ids: tuple[str, ...]  # in acquisition order, along the slice normal
    name: str
    birth_date: str
    head: Head
    bleeds: tuple[Bleed, ...]
    tilt_deg: float  # 0 for an upright gantry
    centre: tuple[float, float, float]  # patient-space centre of the first slice, mm
    spacing: float
    padding: int | None  # HU written outside the circular field of view, or None
    window: tuple[int, int]
    site: Site = SITES["A"]


@dataclass
class SliceFrame:
    """Per-pixel coordinates and tissue maps of one slice, shared by every bleed drawn on it."""

    w: float
    u: np.ndarray
    v: np.ndarray
    r: np.ndarray  # distance from the head centre
    theta: np.ndarray  # angle around the head, in the inner skull's normalised frame
    brain: np.ndarray  # inside the inner skull table
    depth: np.ndarray  # distance inwards from the inner skull table along the radius
    # side (-1 right, 1 left) -> (mask, centre v, half length); filled in once the brain is known
    ventricles: dict[int, tuple[np.ndarray, float, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class Encoded:
    """Stored pixel values and the header tags that say how to turn them back into HU."""

    pixels: np.ndarray
    bits_stored: int
    signed: bool
    intercept: float | None  # None: no RescaleSlope/RescaleIntercept tags at all
    photometric: str = "MONOCHROME2"


# ---------------------------------------------------------------------------------------- planning


def _hex_ids(rng: np.random.Generator, count: int, digits: int) -> list[str]:
    """Unique random `ID_<hex>` names: random, so sorting them says nothing about slice order."""
    values = rng.choice(16**digits, size=count, replace=False)
    return [f"ID_{int(x):0{digits}x}" for x in values]


def _head(rng: np.random.Generator, slices: int, site: Site) -> Head:
    height = SLICE_MM * (slices - 1) / 2 + 3.0
    return Head(
        a=rng.uniform(68, 76),
        b=rng.uniform(86, 96),
        height=height,
        skull=rng.uniform(5, 7),
        scalp=rng.uniform(3, 5),
        cu=rng.uniform(-8, 8),
        cv=rng.uniform(-6, 6),
        bone=rng.uniform(0.92, 1.05),
        grey=rng.uniform(33, 38),
        white=rng.uniform(24, 30),
        csf=rng.uniform(4, 10),
        noise=rng.uniform(*site.noise),
        sulci=int(rng.integers(16, 25)),
        sulcus_phase=rng.uniform(0, 2 * math.pi),
        sulcus_warp=rng.uniform(0, 2 * math.pi),
        vent_w=height * rng.uniform(0.0, 0.2),
        vent_half=height * rng.uniform(0.45, 0.6),
        vent_sep=rng.uniform(5, 8),
        vent_v=rng.uniform(-8, 2),
        vent_a=rng.uniform(4.5, 7),
        vent_b=rng.uniform(16, 24),
        vent_rot=rng.uniform(0.2, 0.4),
        vent_bend=rng.uniform(1, 3),
        cistern_v=rng.uniform(0, 8),
    )


def _lateral(rng: np.random.Generator) -> float:
    """An angle over the left or right convexity, where epidurals usually sit (temporal bone)."""
    return float(rng.choice([0.0, math.pi]) + rng.uniform(-0.6, 0.6))


def _bleed(rng: np.random.Generator, subtype: str, head: Head, span: float) -> Bleed:
    """Place and shape one hemorrhage so that its subtype shows in where it is and how it looks."""
    centre = rng.uniform(-0.25, 0.25) * span
    theta = rng.uniform(-math.pi, math.pi)
    common = dict(theta=theta, spread=0.0, size=0.0, place=0.0, aspect=1.0, angle=0.0)
    if subtype == "epidural":  # short, thick biconvex lens against the inner table
        common.update(theta=_lateral(rng), spread=rng.uniform(0.35, 0.55), size=rng.uniform(10, 16))
        return Bleed(subtype, centre, rng.uniform(10, 16), rng.uniform(65, 80), **common)
    if subtype == "subdural":  # long, thin crescent following the inner table
        common.update(spread=rng.uniform(0.8, 1.3), size=rng.uniform(4.5, 8))
        return Bleed(subtype, centre, rng.uniform(16, 28), rng.uniform(58, 78), **common)
    if subtype == "subarachnoid":  # blood in the sulci of one region, or in the basal cistern ring
        if rng.random() < 0.4:
            low = -head.height * rng.uniform(0.45, 0.65)
            common.update(size=rng.uniform(1.8, 2.6), kind="basal")
            return Bleed(subtype, low, rng.uniform(10, 16), rng.uniform(58, 75), **common)
        common.update(spread=rng.uniform(0.5, 0.9), size=rng.uniform(1.3, 1.7), kind="sulcal")
        return Bleed(subtype, centre, rng.uniform(12, 20), rng.uniform(58, 75), **common)
    if subtype == "intraparenchymal":  # an ovoid clot in the brain tissue, with an edema rim
        radius = rng.uniform(9, 16)
        common.update(size=radius, place=rng.uniform(0.35, 0.6), aspect=rng.uniform(0.6, 1.0))
        common.update(angle=rng.uniform(0, math.pi))
        return Bleed(subtype, centre, radius * rng.uniform(1.0, 1.4), rng.uniform(60, 80), **common)
    # intraventricular: blood layering in the dependent (posterior) part of the ventricles
    common.update(place=rng.uniform(0.35, 0.7), kind=str(rng.choice(["left", "right", "both"])))
    return Bleed(subtype, head.vent_w + rng.uniform(-5, 5), rng.uniform(12, 20), rng.uniform(55, 75), **common)


def _bleeds(rng: np.random.Generator, primary: str | None, head: Head, slices: int) -> tuple[Bleed, ...]:
    """A positive scan has its primary subtype and sometimes one or two more, as real scans do."""
    if primary is None:
        return ()
    subtypes = [primary]
    # extras follow the RSNA prevalence: epidural rarely comes along with another bleed
    extra_weights = np.array([0.05, 1.0, 0.8, 1.0, 1.3])
    for chance in (0.5, 0.2):
        if rng.random() < chance:
            subtypes.append(str(rng.choice(SUBTYPES, p=extra_weights / extra_weights.sum())))
    span = SLICE_MM * (slices - 1)
    return tuple(_bleed(rng, s, head, span) for s in subtypes)


def _site_blood(bleed: Bleed, site: Site) -> Bleed:
    """The bleed at the site's blood density: the acute value drawn for its subtype mapped onto site.bleed_hu."""
    if site.bleed_hu is None:
        return bleed
    low, high = site.bleed_hu
    return replace(bleed, hu=low + (bleed.hu - ACUTE_HU[0]) / (ACUTE_HU[1] - ACUTE_HU[0]) * (high - low))


def _patient(
    index: int, seed: int, slices: int, size: int, ids: dict, primary: str | None, tilted: bool, padded: bool,
    site: Site,
) -> Patient:
    rng = np.random.default_rng([seed, 1, index])
    head = _head(rng, slices, site)
    bleeds = tuple(_site_blood(bleed, site) for bleed in _bleeds(rng, primary, head, slices))
    given = ("Ada", "Bo", "Cleo", "Dov", "Edda", "Finn", "Gus", "Hana")[index % 8]
    birth = f"{rng.integers(1930, 2005)}{rng.integers(1, 13):02d}{rng.integers(1, 29):02d}"
    fov = float(rng.choice(site.fields_of_view))
    padding = int(rng.choice([-2000, -3024]))
    window = (40, 80) if rng.random() < 0.7 else (36, 80)
    return Patient(
        seed=seed,
        index=index,
        patient_id=ids["patient"][index],
        study_uid=ids["study"][index],
        series_uid=ids["series"][index],
        image_ids=tuple(ids["image"][index * slices : (index + 1) * slices]),
        name=f"Phantom^{given}{index:03d}",
        birth_date=birth,
        head=head,
        bleeds=bleeds,
        tilt_deg=round(rng.uniform(*site.tilt), 2) if tilted else 0.0,
        centre=(rng.uniform(-15, 15), rng.uniform(-10, 30), rng.uniform(-150, 60)),
        spacing=round(fov / size, 6),
        padding=padding if padded else None,
        window=window,
        site=site,
    )


def plan_patients(patients: int, slices: int, size: int, seed: int, site: str = "A") -> list[Patient]:
    """Decide every patient up front: ids, who bleeds (with which lead subtype), who is tilted or padded. The same
    seed gives the same heads and bleeds at every site; the site decides how they are imaged."""
    scanner = get_site(site)
    rng = np.random.default_rng([seed, 0])
    ids = {
        "image": _hex_ids(rng, patients * slices, 9),
        "patient": _hex_ids(rng, patients, 8),
        "study": _hex_ids(rng, patients, 10),
        "series": _hex_ids(rng, patients, 10),
    }
    order = rng.permutation(patients)
    positives = order[: round(patients * POSITIVE_PATIENTS)]
    # every subtype, epidural included, leads in some positive scan once there are five of them
    leads = rng.permutation(SUBTYPES).tolist()
    primaries = {int(p): leads[j % len(leads)] for j, p in enumerate(rng.permutation(positives))}
    tilted_count = max(1, round(patients * scanner.tilted)) if scanner.tilted else 0
    tilted = set(rng.permutation(patients)[:tilted_count].tolist())
    padded = set(rng.permutation(patients)[: max(1, round(patients * PADDED_PATIENTS))].tolist())
    return [
        _patient(i, seed, slices, size, ids, primaries.get(i), i in tilted, i in padded, scanner)
        for i in range(patients)
    ]


def assign_quirks(plan: list[Patient], seed: int) -> dict[str, str]:
    """Image id -> quirk, at most one per file: one whole series wraps, a few single files get the rest."""
    rng = np.random.default_rng([seed, 3])
    quirks = {}
    if len(plan) >= 2:
        wrapped = plan[int(rng.integers(len(plan)))]
        quirks.update({image_id: "wrap_12bit" for image_id in wrapped.image_ids})
    others = [i for p in plan for i in p.image_ids if i not in quirks]
    pool = iter(rng.permutation(others).tolist())
    for kind, count in FILE_QUIRKS.items():
        for image_id in [next(pool, None) for _ in range(count)]:
            if image_id is not None:
                quirks[image_id] = kind
    return quirks


# --------------------------------------------------------------------------------------- rendering


def _extent(bleed: Bleed, w: float) -> float:
    """How much of the blob is left at this slice: 1 at its centre, 0 beyond its ends."""
    x = (w - bleed.w0) / bleed.half
    return math.sqrt(1 - x * x) if abs(x) < 1 else 0.0


def _radius(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """`np.hypot`, twice as fast on float32 images and precise enough for drawing."""
    return np.sqrt(x * x + y * y)


def _angle_from(theta: np.ndarray, centre: float) -> np.ndarray:
    """Angular distance from `centre`, wrapped into [0, pi]."""
    return np.abs((theta - centre + np.pi) % (2 * np.pi) - np.pi)


def _outline(head: Head, w: float) -> tuple[float, float, float]:
    """Outer skull semi-axes and skull thickness at w: the head narrows to the top and bottom slices."""
    shrink = math.sqrt(max(0.0, 1 - (w / head.height) ** 2))
    base = min(max(-w / head.height - 0.3, 0.0), 1.0)  # thicker bone at the skull base
    return head.a * shrink, head.b * shrink, head.skull * (1 + 0.6 * base)


def _ventricles(head: Head, f: SliceFrame) -> dict[int, tuple[np.ndarray, float, float]]:
    """Two banana-shaped lateral ventricles whose size and position change from slice to slice."""
    x = (f.w - head.vent_w) / head.vent_half
    if abs(x) >= 1:
        return {}
    g = math.sqrt(1 - x * x)
    half_width, half_length = head.vent_a * (0.5 + 0.5 * g), head.vent_b * (0.4 + 0.6 * g)
    centre_v = head.vent_v + 5 * x
    found = {}
    for side in (-1, 1):
        rot = side * head.vent_rot
        du, dv = f.u - side * (head.vent_sep + 3 * (1 - g)), f.v - centre_v
        along = du * math.sin(rot) + dv * math.cos(rot)
        across = du * math.cos(rot) - dv * math.sin(rot) - side * head.vent_bend * (along / half_length) ** 2
        mask = f.brain & ((across / half_width) ** 2 + (along / half_length) ** 2 <= 1)
        if mask.any():
            found[side] = (mask, centre_v, half_length)
    return found


def _sulci(head: Head, f: SliceFrame, half_width: float, extra_depth: float = 0.0) -> np.ndarray:
    """Thin radial lines from the cortex inwards, a few mm deep, wandering slowly from slice to slice."""
    phase = head.sulci * f.theta + head.sulcus_phase + 0.6 * np.sin(3 * f.theta + head.sulcus_warp) + 0.05 * f.w
    near = np.abs(np.sin(phase)) < head.sulci * half_width / np.maximum(f.r, 1.0)
    deep = 7.0 + 3.0 * np.sin(5 * f.theta + head.sulcus_warp) + extra_depth
    return f.brain & near & (f.depth < deep)


def _cistern(head: Head, f: SliceFrame, half_width: float) -> np.ndarray | None:
    """The basal cistern, a CSF ring around the brainstem in the lower slices."""
    x = (f.w + 0.575 * head.height) / (0.275 * head.height)
    if abs(x) >= 1:
        return None
    radius = 11.0 * math.sqrt(1 - x * x) + 2.0
    ring = np.abs(_radius(f.u / 1.2, f.v - head.cistern_v) - radius) < half_width
    return f.brain & ring


def _epidural(head: Head, b: Bleed, f: SliceFrame, e: float) -> np.ndarray:
    off = _angle_from(f.theta, b.theta) / b.spread
    return f.brain & (f.depth < b.size * e * np.clip(1 - off**2, 0, None))


def _subdural(head: Head, b: Bleed, f: SliceFrame, e: float) -> np.ndarray:
    off = _angle_from(f.theta, b.theta) / b.spread
    return f.brain & (f.depth < b.size * math.sqrt(e) * np.sqrt(np.clip(1 - off**4, 0, None)))


def _subarachnoid(head: Head, b: Bleed, f: SliceFrame, e: float) -> np.ndarray:
    if b.kind == "basal":
        ring = _cistern(head, f, b.size)
        return ring if ring is not None else np.zeros_like(f.brain)
    sector = _angle_from(f.theta, b.theta) < b.spread * (0.5 + 0.5 * e)
    return sector & _sulci(head, f, b.size, extra_depth=2.0)


def _ovoid(head: Head, b: Bleed, f: SliceFrame, e: float, grow: float = 0.0) -> np.ndarray:
    """A lumpy ellipse; `grow` mm wider gives the edema rim around an intraparenchymal clot."""
    cu = b.place * (head.a - head.skull) * math.cos(b.theta)
    cv = b.place * (head.b - head.skull) * math.sin(b.theta)
    ra, rb = b.size * e, b.size * b.aspect * e
    du, dv = f.u - cu, f.v - cv
    x = du * math.cos(b.angle) + dv * math.sin(b.angle)
    y = -du * math.sin(b.angle) + dv * math.cos(b.angle)
    lumps = 1 + 0.15 * np.sin(3 * np.arctan2(y * ra, x * rb) + b.angle) + grow / rb
    return f.brain & (_radius(x / ra, y / rb) <= lumps)


def _intraventricular(head: Head, b: Bleed, f: SliceFrame, e: float) -> np.ndarray:
    sides = {"left": (1,), "right": (-1,), "both": (-1, 1)}[b.kind]
    mask = np.zeros_like(f.brain)
    for side in sides:
        if side in f.ventricles:
            vent, centre_v, half_length = f.ventricles[side]
            mask |= vent & (f.v >= centre_v + half_length * (1 - 2 * b.place))
    return mask


# Per subtype, the pixels one bleed covers on a slice; `e` is how much of the blob reaches that slice.
SHAPES: dict[str, Callable[[Head, Bleed, SliceFrame, float], np.ndarray]] = {
    "epidural": _epidural,
    "subdural": _subdural,
    "subarachnoid": _subarachnoid,
    "intraparenchymal": _ovoid,
    "intraventricular": _intraventricular,
}


def _pixel_mm(n: int, spacing: float) -> np.ndarray:
    """Position (mm) of each pixel centre along one image axis, measured from the image centre."""
    return (np.arange(n, dtype=np.float32) - (n - 1) / 2) * spacing


def _head_box(mm: np.ndarray, centre: float, half: float) -> slice:
    """The pixels along one axis that the head can reach; everything outside is plain air."""
    inside = np.flatnonzero(np.abs(mm - centre) <= half + 2.0)
    return slice(int(inside[0]), int(inside[-1]) + 1) if inside.size else slice(0, 0)


def _draw_head(
    p: Patient, w: float, u: np.ndarray, v: np.ndarray, mask: np.ndarray | None = None
) -> tuple[np.ndarray, set[str]]:
    """HU of the head (no noise) on head-frame coordinates, and the subtypes drawn on it; into `mask`, where
    given, the MASK_VALUES of the blood drawn at each pixel."""
    head = p.head
    a, b, skull = _outline(head, w)
    ai, bi = max(a - skull, 1e-3), max(b - skull, 1e-3)
    r = _radius(u, v)
    rho_out = _radius(u / max(a, 1e-3), v / max(b, 1e-3))
    rho_in = _radius(u / ai, v / bi)
    brain = (rho_in <= 1) & (a > skull)
    depth = r * (1 - rho_in) / np.maximum(rho_in, 1e-3)
    f = SliceFrame(w, u, v, r, np.arctan2(v / bi, u / ai), brain, depth)
    f.ventricles = _ventricles(head, f)

    hu = np.full(u.shape, -1000.0, dtype=np.float32)
    hu[_radius(u / (a + head.scalp), v / (b + head.scalp)) <= 1] = 35.0
    across = np.clip(r * (1 - rho_out) / np.maximum(rho_out, 1e-3) / skull, 0, 1)  # through the bone
    bone = (rho_out <= 1) & ~brain
    hu[bone] = head.bone * (1420 - 640 * np.sin(np.pi * across[bone]))
    hu[brain] = head.white
    hu[brain & (depth < 3.0)] = head.grey
    csf = _sulci(head, f, 0.6)
    for vent, _, _ in f.ventricles.values():
        csf |= vent
    cistern = _cistern(head, f, 1.2)
    if cistern is not None:
        csf |= cistern
    hu[csf] = head.csf

    min_pixels = max(MIN_BLOOD_PIXELS, math.ceil(MIN_BLOOD_MM2 / p.spacing**2))
    visible = set()
    for bleed in p.bleeds:
        e = _extent(bleed, w)
        if e == 0:
            continue
        blood = SHAPES[bleed.subtype](head, bleed, f, e)
        if blood.sum() < min_pixels:
            continue  # too small to see: neither drawn nor labelled
        if bleed.subtype == "intraparenchymal":
            edema = _ovoid(head, bleed, f, e, grow=3.0) & ~blood & ~csf
            hu[edema] = 18.0
            if mask is not None:
                mask[edema] = 0
        hu[blood] = bleed.hu
        if mask is not None:
            mask[blood] = MASK_VALUES[bleed.subtype]
        visible.add(bleed.subtype)
    if p.site.beam_hardening:  # the scanner's, over whatever lies under the skull, blood included
        hu[brain] += p.site.beam_hardening * np.exp(-depth[brain] / BEAM_HARDENING_MM)
    return hu, visible


def render_slice(
    p: Patient, k: int, rows: int, cols: int, mask: np.ndarray | None = None
) -> tuple[np.ndarray, set[str]]:
    """HU image of slice k and the subtypes visible on it; labels are counted on this very grid. `mask`, a
    rows x cols array, receives the MASK_VALUES of the blood drawn at each pixel.

    The image centre lies on the series axis; the head is drawn only in its bounding box, for speed.
    """
    head = p.head
    w = (k - (len(p.image_ids) - 1) / 2) * SLICE_MM
    x, y = _pixel_mm(cols, p.spacing), _pixel_mm(rows, p.spacing)
    box = _head_box(y, head.cv, head.b + head.scalp), _head_box(x, head.cu, head.a + head.scalp)
    u, v = np.meshgrid(x[box[1]] - head.cu, y[box[0]] - head.cv)
    hu = np.full((rows, cols), -1000.0, dtype=np.float32)
    hu[box], visible = _draw_head(p, w, u, v, None if mask is None else mask[box])

    rng = np.random.default_rng([p.seed, 2, p.index, k, rows, cols])
    noise = rng.standard_normal((rows, cols), dtype=np.float32)
    if p.site.kernel != "drawn":
        hu = reconstruction_kernel(hu, p.site, p.spacing)
        noise = reconstruction_kernel(noise, p.site, p.spacing)
        noise /= noise.std()  # the kernel shapes the noise's texture; the site's noise level stays its SD
    hu += noise * head.noise
    if p.padding is not None:  # outside the circular field of view
        hu[x[None, :] ** 2 + y[:, None] ** 2 > (p.spacing * min(rows, cols) / 2) ** 2] = p.padding
    return np.rint(hu), visible


def reconstruction_kernel(image: np.ndarray, site: Site, spacing: float) -> np.ndarray:
    """The image as a smooth or a sharp reconstruction kernel gives it: a Gaussian blur of kernel_mm, or an
    unsharp mask (edges overshoot, fine detail and noise rise) of that width."""
    blurred = cv2.GaussianBlur(image, (0, 0), site.kernel_mm / spacing, borderType=cv2.BORDER_REPLICATE)
    if site.kernel == "smooth":
        return blurred
    return image + SHARPEN * (image - blurred)


def render_series(p: Patient, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A patient's series as volumes, for writing the phantom in other formats (NIfTI with masks): the HU of
    its slices in acquisition order [slices, size, size], as its DICOM files store them, and a uint8 mask of the
    same shape with the MASK_VALUES of the blood drawn at each pixel (0 none; the later bleed where two overlap)."""
    hu = np.empty((len(p.image_ids), size, size), np.float32)
    mask = np.zeros(hu.shape, np.uint8)
    for k in range(len(p.image_ids)):
        hu[k], _ = render_slice(p, k, size, size, mask[k])
    return hu, mask


# ---------------------------------------------------------------------------------------- encoding


def encode(hu: np.ndarray, quirk: str | None) -> Encoded:
    """Stored values for one slice; each quirk stores the same HU the way an odd real file does."""
    if quirk == "wrap_12bit":
        # unsigned 12-bit two's complement with intercept 0: only `(p + 1000) % 4096 - 1000` recovers HU
        stored = np.clip(hu, -1000, 3095).astype(np.int32) % 4096
        return Encoded(stored.astype(np.uint16), bits_stored=12, signed=False, intercept=0.0)
    if quirk == "no_rescale":
        return Encoded(hu.astype(np.int16), bits_stored=16, signed=True, intercept=None)
    # MONOCHROME1 stores the same values: it only tells a viewer to show low values bright (PS3.3 C.11.1)
    photometric = "MONOCHROME1" if quirk == "monochrome1" else "MONOCHROME2"
    stored = (hu + 1024).astype(np.int16)
    return Encoded(stored, bits_stored=16, signed=True, intercept=-1024.0, photometric=photometric)


def _window_tags(window: tuple[int, int], quirk: str | None) -> tuple[object, object]:
    centre, width = window
    if quirk == "window_multivalue":
        return [f"{centre:05d}", f"{centre:05d}"], [f"{width:05d}", f"{width:05d}"]
    if quirk == "window_zero_padded":
        return f"{centre:05d}", f"{width:05d}"
    if quirk == "window_non_integer":
        return f"{centre}.5", f"{width}.5"
    return str(centre), str(width)


def orientation(p: Patient) -> tuple[np.ndarray, np.ndarray]:
    """Row and column directions in patient space; a tilted gantry turns the column direction."""
    t = math.radians(p.tilt_deg)
    return np.array([1.0, 0.0, 0.0]), np.array([0.0, round(math.cos(t), 6), round(-math.sin(t), 6) + 0.0])


def slice_dataset(p: Patient, k: int, enc: Encoded, quirk: str | None) -> Dataset:
    """The DICOM header of one slice, with RSNA's habits: `ID_...` UIDs, no InstanceNumber or SliceLocation."""
    image_id = p.image_ids[k]
    rows, cols = enc.pixels.shape
    row_dir, col_dir = orientation(p)
    normal = np.cross(row_dir, col_dir)
    centre = np.array(p.centre) + k * SLICE_MM * normal
    corner = centre - (cols - 1) / 2 * p.spacing * row_dir - (rows - 1) / 2 * p.spacing * col_dir

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = image_id
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = image_id
    ds.Modality = "CT"
    ds.PatientID = p.patient_id
    ds.PatientName = p.name
    ds.PatientBirthDate = p.birth_date
    ds.StudyInstanceUID = p.study_uid
    ds.SeriesInstanceUID = p.series_uid
    ds.ImagePositionPatient = [round(float(x), 4) + 0.0 for x in corner]
    ds.ImageOrientationPatient = [*row_dir.tolist(), *col_dir.tolist()]
    ds.PixelSpacing = [p.spacing, p.spacing]
    ds.SliceThickness = p.site.thickness
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = enc.photometric
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 16
    ds.BitsStored = enc.bits_stored
    ds.HighBit = enc.bits_stored - 1
    ds.PixelRepresentation = int(enc.signed)
    ds.WindowCenter, ds.WindowWidth = _window_tags(p.window, quirk)
    if enc.intercept is not None:
        ds.RescaleIntercept = round(enc.intercept, 1)
        ds.RescaleSlope = 1
    ds.PixelData = enc.pixels.tobytes()
    return ds


def write_slice(path: Path, p: Patient, k: int, size: int, quirk: str | None) -> set[str]:
    """Render, encode and write one slice; returns the subtypes it shows."""
    cols = size + size // 4 if quirk == "non_square" else size
    hu, visible = render_slice(p, k, rows=size, cols=cols)
    with config.disable_value_validation():  # RSNA's `ID_...` UIDs are invalid on purpose
        ds = slice_dataset(p, k, encode(hu, quirk), quirk)
        dcmwrite(path, ds, enforce_file_format=True)
    if quirk == "unreadable":
        # cut the file inside its pixel data: the header still reads, the pixels do not
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - len(ds.PixelData) // 2])
    return visible


# ---------------------------------------------------------------------------------------- the files


def _write_csv(path: Path, labels: dict[str, set[str]], duplicated: list[str], rng: np.random.Generator) -> None:
    """Six rows per image in Kaggle's order, images shuffled, a few images' rows repeated."""
    blocks = []
    for image_id in rng.permutation(sorted(labels)).tolist():
        shown = labels[image_id]
        values = {s: int(s in shown) for s in SUBTYPES} | {"any": int(bool(shown))}
        blocks.append([f"{image_id}_{label},{values[label]}" for label in CSV_LABEL_ORDER])
    for image_id in duplicated:
        block = next(b for b in blocks if b[0].startswith(f"{image_id}_"))
        blocks.insert(int(rng.integers(len(blocks) + 1)), list(block))
    lines = ["ID,Label", *(row for block in blocks for row in block)]
    path.write_text("\n".join(lines) + "\n")


def _check_settings(patients: int, slices: int, size: int) -> None:
    if patients < 1 or slices < 1:
        raise ValueError(f"phantom: patients ({patients}) and slices ({slices}) must be at least 1.")
    if size < 32:
        raise ValueError(f"phantom: size {size} is too small to draw a head; use size >= 32 (RSNA uses 512).")


def generate(
    out_dir: str | Path, patients: int = 40, slices: int = 12, size: int = 512, seed: int = 0, quirks: bool = True,
    site: str = "A",
) -> dict:
    """Write the phantom into `out_dir` (RSNA layout) as `site` (a name of SITES) images it, and return what was
    written.

    The summary holds counts (`files`, `positives` per label), `quirks` (kind -> image ids,
    empty lists with `quirks=False`), `tilted` (PatientIDs of tilted series) and `series`
    (PatientID -> image ids in true slice order), the ground truth a reader's sorting is checked against.
    """
    _check_settings(patients, slices, size)
    out = Path(out_dir)
    image_dir = out / "stage_2_train"
    image_dir.mkdir(parents=True, exist_ok=True)
    plan = plan_patients(patients, slices, size, seed, site)
    file_quirks = assign_quirks(plan, seed) if quirks else {}

    labels: dict[str, set[str]] = {}
    for p in tqdm(plan, desc="phantom", unit="patient", disable=None):
        for k, image_id in enumerate(p.image_ids):
            labels[image_id] = write_slice(image_dir / f"{image_id}.dcm", p, k, size, file_quirks.get(image_id))

    rng = np.random.default_rng([seed, 4])
    duplicated = rng.permutation(sorted(labels))[:DUPLICATED_IMAGES].tolist() if quirks else []
    _write_csv(out / "stage_2_train.csv", labels, duplicated, rng)

    by_kind = {kind: sorted(i for i, q in file_quirks.items() if q == kind) for kind in QUIRK_KINDS}
    by_kind["duplicate_rows"] = sorted(duplicated)
    return {
        "out_dir": str(out),
        "site": site,
        "files": len(labels),
        "positives": {
            label: sum(bool(s) if label == "any" else label in s for s in labels.values()) for label in LABELS
        },
        "quirks": by_kind,
        "tilted": [p.patient_id for p in plan if p.tilt_deg],
        "series": {p.patient_id: list(p.image_ids) for p in plan},
    }


def generate_images(
    out_dir: str | Path, patients: int = 40, slices: int = 12, size: int = 512, seed: int = 0,
    window: tuple[float, float] = (40.0, 80.0), site: str = "A",
) -> dict:
    """Write the same phantom as an image folder (`data=images`): one brain-windowed 8-bit PNG per slice in
    `images/`, and `labels.csv` with `filename`, `patient`, `series`, `slice` (its number along the head) and
    the six labels. Returns counts."""
    _check_settings(patients, slices, size)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    brain = Window(*window)
    rows = []
    for p in tqdm(plan_patients(patients, slices, size, seed, site), desc="phantom images", unit="patient", disable=None):
        for k, image_id in enumerate(p.image_ids):
            hu, shown = render_slice(p, k, size, size)
            cv2.imwrite(str(out / "images" / f"{image_id}.png"), brain(hu))
            values = {s: int(s in shown) for s in SUBTYPES} | {"any": int(bool(shown))}
            rows.append({"filename": f"images/{image_id}.png", "patient": p.patient_id, "series": p.series_uid,
                         "slice": k, **{label: values[label] for label in LABELS}})
    table = pd.DataFrame(rows)
    table.to_csv(out / "labels.csv", index=False)
    return {"out_dir": str(out), "files": len(table), "positives": table[list(LABELS)].sum().astype(int).to_dict()}
