"""Read one CT slice from DICOM into Hounsfield units, handling the quirks of real RSNA and hospital files.

Every failure leaves as a DicomReadError with a short machine-readable `reason`, so callers can skip a
bad file, count it and log its id instead of crashing an epoch.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom import config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

AIR_HU = -1024.0
MAX_HU = 3071.0
# Bump when read_hu_square gives other pixels for some file: slice caches of another version are rebuilt.
# 3: slices stored mirrored or turned are turned to the standard axial orientation.
READER_VERSION = 3
# Uncompressed little-endian 16-bit data is read straight from the bytes: pydicom's generic decoder
# adds ~0.7 ms per 512x512 slice (gathering options, copying), more than parsing the file itself.
_NATIVE_LITTLE_ENDIAN = (ImplicitVRLittleEndian, ExplicitVRLittleEndian)
_DECODER_PACKAGES = "pip install pylibjpeg pylibjpeg-openjpeg pylibjpeg-libjpeg (or pip install python-gdcm)"
# What the index admits by default (data.modalities): CT alone. Secondary captures (OT, SC) converted from CT
# volumes hold CT values too, but only the user knows that of a dataset.
CT_ONLY = ("CT",)
# A slice of a NIfTI volume, unpacked by ich.data.nifti when the index is built: int16 HU in a .npy file.
UNPACKED_SUFFIX = ".npy"


class DicomReadError(Exception):
    """One typed error for any file that cannot give a usable CT slice.

    `reason` is one of: unreadable, bad_header, no_pixel_data, multi_frame, not_monochrome, not_ct,
    no_decoder, bad_pixel_data.
    """

    def __init__(self, path: str | Path, reason: str, message: str) -> None:
        # All three go to Exception so the error pickles back from DataLoader worker processes.
        super().__init__(path, reason, message)
        self.path = Path(path)
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class PixelFormat:
    """The tags that turn a slice's stored pixels into HU: all that reading the pixels needs."""

    bits_stored: int
    pixel_representation: int  # 0 unsigned, 1 signed
    rescale_slope: float  # 1 if missing
    rescale_intercept: float  # 0 if missing; as stored, before the 12-bit wrap fix
    photometric: str
    rows: int
    columns: int


@dataclass(frozen=True)
class SliceHeader(PixelFormat):
    """The tags of one slice that indexing, ordering and HU conversion need."""

    image_id: str  # file stem, e.g. "ID_12cadc6af" (RSNA ids are the file names)
    patient: str  # PatientID as stored ("" if missing)
    study: str  # StudyInstanceUID as stored ("" if missing)
    series: str  # SeriesInstanceUID as stored ("" if missing)
    position: float  # ImagePositionPatient along the slice normal, mm (nan if tags missing)
    window_center: float  # first value (nan if missing)
    window_width: float  # first value (nan if missing)
    instance: float  # InstanceNumber (nan if missing): the slice order of a series without position tags
    field_of_view: float  # mm (ich.data.dicom.field_of_view; nan without PixelSpacing)


def first_float(value: object) -> float:
    """First number of a DS/IS/multi-value/string tag value ("00040", "1906.5", [40, 40]); nan if missing."""
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    if isinstance(value, str):
        value = value.split("\\")[0]
    elif isinstance(value, Sequence):
        value = value[0] if len(value) else None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def field_of_view(pixel_spacing: Sequence | None, rows: int, columns: int) -> float:
    """The side (mm) of the square a slice is fitted into (fit_to_square): the larger of Rows x the spacing between
    rows and Columns x the spacing between columns (PixelSpacing holds them in that order); nan without it.

    The model sees that square at data.image_size pixels whatever the matrix, so the field of view, not PixelSpacing
    alone, sets how large a head looks to it: 512 x 0.5 mm and 256 x 1 mm look alike, 512 x 0.7 mm does not.
    """
    if pixel_spacing is None or len(pixel_spacing) != 2:
        return math.nan
    between_rows, between_columns = (first_float(value) for value in pixel_spacing)
    return float(np.max([rows * between_rows, columns * between_columns]))  # nan when either is


def slice_position(image_position: Sequence | None, image_orientation: Sequence | None) -> float:
    """Distance (mm) of a slice along its normal turned toward the head: the sort key of a series, feet to head.

    Plain z is wrong on tilted gantries, where slices also shift along y; the projection of
    ImagePositionPatient on row x column (the normal) is not. A mirrored orientation such as
    [-1,0,0,0,1,0] makes row x column point to the feet, so the normal is turned toward +z (LPS: the head).
    """
    if image_position is None or image_orientation is None:
        return math.nan
    if len(image_position) != 3 or len(image_orientation) != 6:
        return math.nan
    rx, ry, rz, cx, cy, cz = (float(v) for v in image_orientation)
    normal = (ry * cz - rz * cy, rz * cx - rx * cz, rx * cy - ry * cx)
    # Cosines are often stored with 4 decimals; normalising keeps the result in mm.
    length = math.sqrt(sum(n * n for n in normal))
    if length == 0:
        return math.nan
    if normal[2] < 0:
        length = -length
    return sum(float(p) * n for p, n in zip(image_position, normal)) / length


def standard_plane(hu: np.ndarray, image_orientation: Sequence[float] | None) -> np.ndarray:
    """An axial slice turned to the standard orientation [1,0,0,0,1,0] that RSNA's slices have: the patient's right
    on the image's left, anterior at the top. A series stored mirrored or turned then gives the model the pixels
    it was trained on.

    Each cosine vector is snapped to its dominant axis, so a tilted gantry ([1,0,0,0,0.98,-0.2]) counts as standard
    and costs nothing; slices that are not axial (reformats) and slices without orientation are kept as stored.
    """
    if image_orientation is None or len(image_orientation) != 6:
        return hu
    row, column = image_orientation[:3], image_orientation[3:]
    row_axis = max(range(3), key=lambda axis: abs(row[axis]))
    column_axis = max(range(3), key=lambda axis: abs(column[axis]))
    if {row_axis, column_axis} != {0, 1}:
        return hu
    if row_axis == 1:  # columns run along y and rows along x: swap them
        hu, row, column = hu.T, column, row
    if row[0] < 0:
        hu = hu[:, ::-1]
    if column[1] < 0:
        hu = hu[::-1, :]
    return hu if hu.flags.c_contiguous else np.ascontiguousarray(hu)


def read_header(path: str | Path, modalities: Sequence[str] = CT_ONLY) -> SliceHeader:
    """Read the tags of a slice without its pixel data: fast enough to index 750k files.

    A Modality outside `modalities` raises `not_ct` (a missing Modality counts as CT).
    """
    # RSNA's "ID_..." UIDs fail pydicom's value validation on every read; ich parses each value it
    # uses itself, so validation would only warn (and log through Hydra's handlers). It is switched
    # off for the read alone, not for the rest of the process.
    with config.disable_value_validation():
        return _parse_header(path, _open(path, header_only=True), modalities)


def read_slice(path: str | Path, modalities: Sequence[str] = CT_ONLY) -> tuple[SliceHeader, np.ndarray]:
    """Read a slice as its header and its HxW float32 image in HU, clipped to [-1024, 3071]; a Modality
    outside `modalities` raises `not_ct`, as in read_header."""
    with config.disable_value_validation():
        ds = _open(path, header_only=False)
        header = _parse_header(path, ds, modalities)
        return header, _pixels_in_hu(path, ds, header)


def read_hu(path: str | Path) -> np.ndarray:
    """Read a slice as an HxW float32 image in HU, as read_slice does; a `.npy` is a slice that
    ich.data.nifti unpacked from a volume, already in HU.

    Only the pixel tags and ImageOrientationPatient (to turn the slice to the standard orientation) are parsed:
    the identity and position tags cost about a fifth of a read. The modality is not checked: the index decided
    which files to admit (data.modalities).
    """
    if Path(path).suffix == UNPACKED_SUFFIX:
        return _unpacked_hu(path)
    with config.disable_value_validation():
        ds = _open(path, header_only=False)
        return _pixels_in_hu(path, ds, _parse_pixel_format(path, ds))


def read_hu_square(path: str | Path, size: int) -> np.ndarray:
    """Read a slice as size x size int16 HU: the pixels training windows and the slice cache stores.

    HU are rounded after resizing: CT stores whole HU, int16 halves the cache, and windowing
    whole HU is one vectorised integer pass per window.
    """
    return square_hu(read_hu(path), size)


def square_hu(hu: np.ndarray, size: int) -> np.ndarray:
    """An HU image as read_hu_square makes it: padded to a square, resized to size x size, rounded to int16. `hu`
    may be rounded in place when it already is a float32 size x size image."""
    square = fit_to_square(hu, size)
    return np.rint(square, out=square).astype(np.int16)


def _unpacked_hu(path: str | Path) -> np.ndarray:
    try:
        return np.load(path).astype(np.float32)
    except (OSError, ValueError) as err:  # removed or damaged since the index unpacked it
        raise DicomReadError(
            path, "unreadable", f"{path}, a slice unpacked from a NIfTI volume, cannot be read ({error_line(err)}): "
            "rebuild the index with `python -m ich.prepare force=true`."
        ) from err


def fit_to_square(hu: np.ndarray, size: int) -> np.ndarray:
    """Pad an HU image to a square with air (keeping it centred), then resize it to size x size.

    Returns float32; the input itself when it already is a float32 size x size image.
    """
    hu = hu.astype(np.float32, copy=False)
    rows, columns = hu.shape
    side = max(rows, columns)
    if rows != columns:
        square = np.full((side, side), AIR_HU, dtype=np.float32)
        top, left = (side - rows) // 2, (side - columns) // 2
        square[top : top + rows, left : left + columns] = hu
        hu = square
    if side == size:
        return hu
    interpolation = cv2.INTER_AREA if size < side else cv2.INTER_LINEAR
    return cv2.resize(hu, (size, size), interpolation=interpolation)


def _open(path: str | Path, header_only: bool) -> Dataset:
    # No force=True: it turns any file into a (junk) dataset; RSNA files carry the DICM preamble.
    try:
        return pydicom.dcmread(path, stop_before_pixels=header_only)
    except InvalidDicomError as err:
        raise DicomReadError(
            path, "unreadable", f"{path} is not a DICOM file (no DICM preamble): re-export it or leave it out."
        ) from err
    except OSError as err:
        raise DicomReadError(
            path, "unreadable", f"{path} cannot be opened ({error_line(err)}): check the path and its permissions."
        ) from err
    except Exception as err:  # a parser fed arbitrary bytes fails in many ways; each means "unreadable"
        raise DicomReadError(
            path, "unreadable", f"{path} is not a readable DICOM file ({error_line(err)}): re-export it or leave it out."
        ) from err


def _parse_header(path: str | Path, ds: Dataset, modalities: Sequence[str]) -> SliceHeader:
    pixel_format = _parse_pixel_format(path, ds)
    _check_modality(path, ds, modalities)
    try:
        return SliceHeader(
            **vars(pixel_format),
            image_id=Path(path).stem,
            patient=str(ds.get("PatientID", "")),
            study=str(ds.get("StudyInstanceUID", "")),
            series=str(ds.get("SeriesInstanceUID", "")),
            position=slice_position(ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")),
            window_center=first_float(ds.get("WindowCenter")),
            window_width=first_float(ds.get("WindowWidth")),
            instance=first_float(ds.get("InstanceNumber")),
            field_of_view=field_of_view(ds.get("PixelSpacing"), pixel_format.rows, pixel_format.columns),
        )
    except Exception as err:  # tags are decoded lazily here, so any malformed value surfaces now
        raise _bad_header(path, err) from err


def _parse_pixel_format(path: str | Path, ds: Dataset) -> PixelFormat:
    try:
        bits_stored = tag_value(ds, "BitsStored")
        header = PixelFormat(
            bits_stored=int(tag_value(ds, "BitsAllocated", 16) if bits_stored is None else bits_stored),
            pixel_representation=int(tag_value(ds, "PixelRepresentation", 0)),
            rescale_slope=_number_or_default(ds, "RescaleSlope", 1.0),
            rescale_intercept=_number_or_default(ds, "RescaleIntercept", 0.0),
            photometric=str(tag_value(ds, "PhotometricInterpretation", "")).strip(),
            rows=int(tag_value(ds, "Rows", 0)),
            columns=int(tag_value(ds, "Columns", 0)),
        )
        frames = int(float(tag_value(ds, "NumberOfFrames", 1) or 1))
        samples = int(tag_value(ds, "SamplesPerPixel", 1))
    except Exception as err:  # tags are decoded lazily here, so any malformed value surfaces now
        raise _bad_header(path, err) from err
    if header.rows <= 0 or header.columns <= 0:
        raise DicomReadError(path, "no_pixel_data", f"{path} has no Rows/Columns, so no image: leave it out.")
    if frames != 1:
        raise DicomReadError(
            path,
            "multi_frame",
            f"{path} holds {frames} frames, not one CT slice: split it into one file per slice.",
        )
    if samples != 1 or header.photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomReadError(
            path,
            "not_monochrome",
            f"{path} is {header.photometric or 'untyped'} with {samples} samples per pixel, "
            "not a greyscale CT slice: leave it out.",
        )
    if not 0 < header.rescale_slope <= MAX_SLOPE or abs(header.rescale_intercept) > MAX_INTERCEPT:
        raise DicomReadError(
            path,
            "bad_header",
            f"{path} has RescaleSlope {header.rescale_slope:g} and RescaleIntercept {header.rescale_intercept:g}, "
            "which no CT uses: fix or re-export the file.",
        )
    return header


def admitted_modalities(modalities: Sequence[str]) -> frozenset[str]:
    """data.modalities as the Modality values they admit: `[ct, " OT"]` admits CT and OT."""
    return frozenset(m.strip().upper() for m in modalities)


def _check_modality(path: str | Path, ds: Dataset, modalities: Sequence[str]) -> None:
    modality = str(tag_value(ds, "Modality") or "CT").strip().upper()  # absent: trust the folder to hold CT
    if modality not in admitted_modalities(modalities):
        admitted = ",".join(dict.fromkeys([*(m.strip().upper() for m in modalities), modality]))
        raise DicomReadError(
            path, "not_ct", f"{path} has Modality {modality}, not CT, so Hounsfield windows may mean nothing for it: "
            f"leave it out, or admit it with data.modalities=[{admitted}] if its pixels are CT values "
            "(a secondary capture converted from a CT volume)."
        )


# Beyond these the stored pixels cannot be Hounsfield units (CT slopes are ~1, intercepts ~-1024 or 0).
MAX_SLOPE = 100.0
MAX_INTERCEPT = 10_000.0


def tag_value(ds: Dataset, keyword: str, default: object = None) -> object:
    """The value of a pixel-format tag, decoded here when pydicom has not yet: US/SS as int, IS/DS/CS as
    the stripped string; anything else through pydicom's `ds.get`.

    pydicom converts each element through several layers on first access, ~10 us a tag; the dozen
    short tags a slice needs cost more than parsing the file. Same values, for ~1 us a tag.
    """
    element = ds.get_item(_TAGS[keyword])
    if element is None:
        return default
    if not isinstance(element, RawDataElement):
        return element.value
    vr, value = element.VR or dictionary_VR(element.tag), element.value
    if vr in ("US", "SS") and value is not None and len(value) == 2:
        return int.from_bytes(value, "little" if element.is_little_endian else "big", signed=vr == "SS")
    if vr in ("IS", "DS", "CS") and value is not None:
        return value.decode("ascii", errors="replace").strip(" \0")
    return ds.get(keyword, default)  # "US or SS", several values, other VRs: pydicom knows best


_TAGS = {keyword: tag_for_keyword(keyword) for keyword in (
    "BitsStored", "BitsAllocated", "PixelRepresentation", "RescaleSlope", "RescaleIntercept",
    "PhotometricInterpretation", "Rows", "Columns", "NumberOfFrames", "SamplesPerPixel", "Modality",
    "PixelPaddingValue",
)}
_ORIENTATION_TAG = tag_for_keyword("ImageOrientationPatient")  # read by _orientation, as tag_value reads _TAGS


def _bad_header(path: str | Path, err: Exception) -> DicomReadError:
    return DicomReadError(
        path, "bad_header", f"{path} has a tag that cannot be parsed ({error_line(err)}): fix or re-export the file."
    )


def error_line(err: Exception) -> str:
    """The cause of a library error on one line, to keep DicomReadError messages one sentence."""
    return " ".join(str(err).split()) or type(err).__name__


def _number_or_default(ds: Dataset, keyword: str, default: float) -> float:
    """A missing tag takes its default; a present one that is no number must not pass as the default."""
    value = tag_value(ds, keyword)
    if value is None or value == "":
        return default
    number = first_float(value)
    if math.isnan(number):
        raise ValueError(f"{keyword} is {value!r}, not a number")
    return number


def _optional_int(path: str | Path, ds: Dataset, keyword: str) -> int | None:
    try:
        value = tag_value(ds, keyword)
        return None if value is None or value == "" else int(value)
    except Exception as err:  # decoded lazily, like every tag
        raise DicomReadError(
            path, "bad_header", f"{path} has an unparsable {keyword} ({error_line(err)}): fix or re-export the file."
        ) from err


def _pixels_in_hu(path: str | Path, ds: Dataset, header: PixelFormat) -> np.ndarray:
    hu = _to_hu(_stored_pixels(path, ds, header), header, _optional_int(path, ds, "PixelPaddingValue"))
    return standard_plane(hu, _orientation(path, ds))


def _orientation(path: str | Path, ds: Dataset) -> list[float] | None:
    """ImageOrientationPatient as six numbers, read from the raw bytes like tag_value; None when it is missing or
    does not hold six values (the pixels then stay as stored)."""
    element = ds.get_item(_ORIENTATION_TAG)
    value = None if element is None else element.value
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    if isinstance(value, str):
        value = value.strip(" \0").split("\\")
    if not isinstance(value, Sequence) or len(value) != 6:
        return None
    try:
        return [float(v) for v in value]
    except ValueError as err:
        raise _bad_header(path, err) from err


def _stored_pixels(path: str | Path, ds: Dataset, header: PixelFormat) -> np.ndarray:
    """The stored (pre-rescale) integer pixels, HxW, with bits above BitsStored ignored."""
    if "PixelData" not in ds:
        raise DicomReadError(path, "no_pixel_data", f"{path} has no PixelData: leave it out.")
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None:
        raise DicomReadError(path, "unreadable", f"{path} has no Transfer Syntax UID: re-export it.")
    if syntax in _NATIVE_LITTLE_ENDIAN and tag_value(ds, "BitsAllocated") == 16:
        return _native_pixels(path, ds.PixelData, header)
    _require_decoder(path, UID(syntax))
    try:
        pixels = ds.pixel_array
    except Exception as err:  # the decoder plugins raise their own types; all mean the same to us
        raise DicomReadError(
            path, "bad_pixel_data", f"{path} has pixel data that cannot be decoded ({error_line(err)}): re-export it."
        ) from err
    if pixels.shape != (header.rows, header.columns):
        raise DicomReadError(
            path,
            "bad_pixel_data",
            f"{path} decodes to {pixels.shape}, not Rows x Columns {header.rows}x{header.columns}: re-export it.",
        )
    return pixels


def _native_pixels(path: str | Path, data: bytes, header: PixelFormat) -> np.ndarray:
    expected = header.rows * header.columns * 2
    if len(data) != expected:
        raise DicomReadError(
            path,
            "bad_pixel_data",
            f"{path} has {len(data)} bytes of pixel data where Rows x Columns "
            f"{header.rows}x{header.columns} need {expected}: the file is truncated or its tags are wrong.",
        )
    dtype = np.dtype("<i2") if header.pixel_representation else np.dtype("<u2")
    pixels = np.frombuffer(data, dtype=dtype).reshape(header.rows, header.columns)
    unused = 16 - header.bits_stored
    if 0 < unused < 16:
        # Bits above BitsStored hold no information (PS3.5 8.1.1); pydicom ignores them too.
        if header.pixel_representation:
            pixels = np.right_shift(np.left_shift(pixels, unused), unused)
        else:
            pixels = np.bitwise_and(pixels, (1 << header.bits_stored) - 1)
    return pixels


def _require_decoder(path: str | Path, syntax: UID) -> None:
    try:
        available = get_decoder(syntax).is_available
    except NotImplementedError:
        available = False
    if not available:
        raise DicomReadError(
            path,
            "no_decoder",
            f"{path} is compressed as {syntax.name} and no installed decoder reads it: {_DECODER_PACKAGES}.",
        )


def _wraps_12_bit(header: PixelFormat) -> bool:
    """RSNA's known bad files: unsigned 12-bit pixels that hold two's complement HU and intercept ~0."""
    return header.bits_stored == 12 and header.pixel_representation == 0 and header.rescale_intercept > -100


def _to_hu(stored: np.ndarray, header: PixelFormat, padding: int | None) -> np.ndarray:
    """Rescale stored pixels to float32 HU, the 12-bit wrap undone, padding and out-of-range values set to air.

    MONOCHROME1 is rescaled as stored, like MONOCHROME2: it only tells a viewer to display low values
    bright (PS3.3 C.7.6.3.1.2, C.11.1).
    """
    intercept = header.rescale_intercept
    wraps = _wraps_12_bit(header)
    if padding is not None and not wraps and padding * header.rescale_slope + intercept <= AIR_HU:
        padding = None  # it rescales below air (RSNA's -2000 does), so the clip below makes it air anyway
    is_padding = stored == padding if padding is not None else None
    if wraps:
        pixels = stored.astype(np.int32)
        pixels += 1000
        pixels &= 0xFFF  # == % 4096 for the non-negative values left here
        intercept = -1000.0
        hu = pixels.astype(np.float32)
    else:
        hu = stored.astype(np.float32)
    if header.rescale_slope != 1.0:
        hu *= np.float32(header.rescale_slope)
    hu += np.float32(intercept)
    if is_padding is not None:
        hu[is_padding] = AIR_HU
    return np.clip(hu, AIR_HU, MAX_HU, out=hu)
