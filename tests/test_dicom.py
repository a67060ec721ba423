import logging
import math
import pickle
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom import config
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, SecondaryCaptureImageStorage

from ich.core.privacy import pseudonym
from ich.data.dicom import (DicomReadError, SliceHeader, first_float, fit_to_square, read_header, read_hu, read_slice,
                            slice_position)
from ich.data.index import load_or_build_index
from ich.data.windows import Window

# A small known head-CT-like HU image: air, fat, water, brain, blood, bone.
KNOWN_HU = np.resize(np.array([-1000, -100, 0, 40, 80, 1000, 3000, -500], dtype=np.int16), (32, 32))


def write_ct(path: Path, stored: np.ndarray, *, bits_stored: int = 16, **tags) -> Path:
    """Write one RSNA-like CT slice (ID_... UIDs, 16-bit pixels); a tag given as None is left out."""
    with config.disable_value_validation():
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = path.stem
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = path.stem
        ds.PatientID = "ID_0a1b2c3d"
        ds.StudyInstanceUID = "ID_5e6f7a8b"
        ds.SeriesInstanceUID = "ID_9c0d1e2f"
        ds.Modality = "CT"
        ds.Rows, ds.Columns = stored.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = bits_stored
        ds.HighBit = bits_stored - 1
        ds.PixelRepresentation = int(stored.dtype.kind == "i")
        ds.ImagePositionPatient = [-125.0, -125.0, 40.0]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.RescaleSlope = 1
        ds.RescaleIntercept = -1024
        ds.WindowCenter = 40
        ds.WindowWidth = 80
        for keyword, value in tags.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        ds.PixelData = stored.astype(stored.dtype.newbyteorder("<")).tobytes()
        ds.save_as(path, enforce_file_format=True)
    return path


def write_hu(path: Path, hu: np.ndarray = KNOWN_HU, **tags) -> Path:
    """Write signed pixels that hold `hu` under intercept -1024, as most RSNA files do."""
    return write_ct(path, (hu + 1024).astype(np.int16), **tags)


def assert_error(path: Path, reason: str) -> DicomReadError:
    with pytest.raises(DicomReadError) as err:
        read_slice(path)
    assert err.value.reason == reason, str(err.value)
    assert err.value.path == path and str(path) in str(err.value)
    assert "\n" not in str(err.value)  # one sentence, fit for one log line
    return err.value


# Real CT files shipped in pydicom's wheel.


def central(hu: np.ndarray) -> np.ndarray:
    rows, columns = hu.shape
    return hu[rows * 3 // 8 : rows * 5 // 8, columns * 3 // 8 : columns * 5 // 8]


def test_ct_small_reads_header_and_plausible_hu():
    header, hu = read_slice(get_testdata_file("CT_small.dcm"))
    assert hu.shape == (128, 128) and hu.dtype == np.float32
    assert (header.image_id, header.patient, header.rows, header.columns) == ("CT_small", "1CT1", 128, 128)
    assert header.study.startswith("1.3.6.1.4.1.5962") and header.series.startswith("1.3.6.1.4.1.5962")
    assert (header.rescale_slope, header.rescale_intercept) == (1.0, -1024.0)
    assert header.position == pytest.approx(-75.699997)
    assert math.isnan(header.window_center) and math.isnan(header.window_width)
    # A body phantom: lung-like air below -800, bone above 1000, soft tissue in the middle.
    assert hu.min() < -800 and hu.max() > 1000
    assert 0 < np.median(central(hu)) < 200


def test_lossless_jpeg2000_head_ct_decodes_to_hu():
    header, hu = read_slice(get_testdata_file("J2K_pixelrep_mismatch.dcm"))
    assert hu.shape == (512, 512) and hu.dtype == np.float32
    assert (header.window_center, header.window_width) == (40.0, 100.0)
    assert (header.bits_stored, header.pixel_representation) == (13, 1)
    # Outside the head: -2000 padding, clipped to air; a sign error would turn it into 3071 instead.
    assert hu.min() == -1024 and (hu == -1024).mean() > 0.2
    assert (hu >= 3071).mean() < 0.001
    assert (hu > 300).mean() > 0.01  # skull
    assert 0 < np.median(central(hu)) < 80  # brain


def test_tilted_real_series_position_is_the_projection_on_the_normal():
    header = read_header(get_testdata_file("J2K_pixelrep_mismatch.dcm"))
    ds = pydicom.dcmread(get_testdata_file("J2K_pixelrep_mismatch.dcm"), stop_before_pixels=True)
    orientation = np.array(ds.ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    expected = np.dot(np.array(ds.ImagePositionPatient, dtype=float), normal / np.linalg.norm(normal))
    assert header.position == pytest.approx(expected)
    assert header.position != pytest.approx(float(ds.ImagePositionPatient[2]))  # tilted: not plain z


def test_lossy_jpeg2000_head_ct_decodes_to_hu():
    header, hu = read_slice(get_testdata_file("693_J2KI.dcm"))
    assert hu.shape == (512, 512) and header.patient == "CQ500-CT-310"
    assert hu.min() == -1024 and (hu == -1024).mean() > 0.2
    assert (hu > 300).mean() > 0.01
    assert 0 < np.median(central(hu)) < 80


# One written file per quirk.


def test_rsna_uids_raise_no_warning_and_log_nothing(tmp_path, caplog):
    path = write_hu(tmp_path / "ID_12cadc6af.dcm")
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING, logger="pydicom"):
        warnings.simplefilter("always")
        header, _ = read_slice(path)
        read_header(path)
    assert [str(w.message) for w in caught] == []
    assert caplog.records == []
    assert (header.image_id, header.patient, header.series) == ("ID_12cadc6af", "ID_0a1b2c3d", "ID_9c0d1e2f")


def test_known_hu_survives_the_round_trip(tmp_path):
    np.testing.assert_array_equal(read_hu(write_hu(tmp_path / "ID_a.dcm")), KNOWN_HU)


def test_missing_rescale_tags_mean_slope_1_intercept_0(tmp_path):
    path = write_ct(tmp_path / "ID_a.dcm", KNOWN_HU, RescaleSlope=None, RescaleIntercept=None)
    header, hu = read_slice(path)
    assert (header.rescale_slope, header.rescale_intercept) == (1.0, 0.0)
    np.testing.assert_array_equal(hu, KNOWN_HU)


def test_rescale_tag_that_is_no_number_is_bad_header(tmp_path):
    path = write_hu(tmp_path / "ID_a.dcm", RescaleSlope="7.25")
    path.write_bytes(path.read_bytes().replace(b"7.25", b"abc "))  # pydicom refuses to write it
    with pytest.raises(DicomReadError, match="RescaleSlope") as err:
        read_header(path)
    assert err.value.reason == "bad_header"


def test_rescale_slope_is_applied(tmp_path):
    path = write_ct(tmp_path / "ID_a.dcm", ((KNOWN_HU + 1024) * 2).astype(np.int16), RescaleSlope=0.5)
    np.testing.assert_array_equal(read_hu(path), KNOWN_HU)


def test_12_bit_unsigned_wrap_is_undone(tmp_path):
    # RSNA's bad files: two's complement 12-bit HU stored as unsigned, with intercept 0 (or 1).
    for intercept in (0, 1):
        stored = (KNOWN_HU.astype(np.int32) % 4096).astype(np.uint16)
        path = write_ct(tmp_path / f"ID_{intercept}.dcm", stored, bits_stored=12, RescaleIntercept=intercept)
        header, hu = read_slice(path)
        assert header.rescale_intercept == intercept  # reported as stored
        np.testing.assert_array_equal(hu, KNOWN_HU)


def test_12_bit_unsigned_with_normal_intercept_is_left_alone(tmp_path):
    path = write_ct(tmp_path / "ID_a.dcm", (KNOWN_HU + 1024).astype(np.uint16), bits_stored=12)
    np.testing.assert_array_equal(read_hu(path), KNOWN_HU)


def test_bits_above_bits_stored_are_ignored_like_pydicom_does(tmp_path):
    # Signed 12-bit values whose 4 unused high bits hold garbage.
    values = (KNOWN_HU // 2).astype(np.int16)
    garbage = ((values.view(np.uint16) & 0x0FFF) | 0xA000).view(np.int16)
    path = write_ct(tmp_path / "ID_a.dcm", garbage, bits_stored=12, RescaleIntercept=0)
    hu = read_hu(path)
    np.testing.assert_array_equal(hu, values)
    np.testing.assert_array_equal(hu, pydicom.dcmread(path).pixel_array)


def test_rle_compressed_slice_reads_like_the_uncompressed_one(tmp_path):
    plain = write_hu(tmp_path / "ID_plain.dcm")
    with config.disable_value_validation():
        ds = pydicom.dcmread(plain)
        ds.compress(RLELossless)
        ds.save_as(tmp_path / "ID_rle.dcm")
    np.testing.assert_array_equal(read_hu(tmp_path / "ID_rle.dcm"), read_hu(plain))


@pytest.mark.parametrize(
    ("center", "width", "expected"),
    [
        (["00040", "00040"], ["00080", "00080"], (40.0, 80.0)),
        ("00040", "00080", (40.0, 80.0)),
        ("1906.5", "4047", (1906.5, 4047.0)),
        (None, None, (math.nan, math.nan)),
    ],
)
def test_window_tags_give_their_first_value_as_float(tmp_path, center, width, expected):
    header = read_header(write_hu(tmp_path / "ID_a.dcm", WindowCenter=center, WindowWidth=width))
    np.testing.assert_equal((header.window_center, header.window_width), expected)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("00040", 40.0), ("1906.5", 1906.5), (b"40\\40", 40.0), ("40\\80", 40.0), ([-3, 7], -3.0), (12, 12.0)],
)
def test_first_float_parses_raw_tag_values(value, expected):
    assert first_float(value) == expected


@pytest.mark.parametrize("value", [None, "", [], "abc"])
def test_first_float_is_nan_without_a_number(value):
    assert math.isnan(first_float(value))


def test_padding_outside_the_field_of_view_becomes_air_and_windows_to_zero(tmp_path):
    hu = KNOWN_HU.copy()
    hu[:4] = -2000
    hu[-4:] = -3024
    read = read_hu(write_ct(tmp_path / "ID_a.dcm", hu, RescaleIntercept=0))
    assert (read[:4] == -1024).all() and (read[-4:] == -1024).all()
    assert (Window(40, 80)(read[:4]) == 0).all() and (Window(600, 2800)(read[-4:]) == 0).all()
    np.testing.assert_array_equal(read[4:-4], KNOWN_HU[4:-4])


def test_pixel_padding_value_tag_marks_air(tmp_path):
    # Stored 0 would be -1000 HU under intercept -1000; as the declared padding it is air.
    stored = (KNOWN_HU + 1000).astype(np.uint16)
    path = write_ct(tmp_path / "ID_a.dcm", stored, RescaleIntercept=-1000, PixelPaddingValue=0)
    hu = read_hu(path)
    np.testing.assert_array_equal(hu[KNOWN_HU == -1000], -1024)
    np.testing.assert_array_equal(hu[KNOWN_HU != -1000], KNOWN_HU[KNOWN_HU != -1000])


# Stored values chosen by hand; each row reads as 0, 40, -1000 and 1000 HU.
MONOCHROME1_FILES = {
    "unsigned 16-bit, intercept -1024": ([1024, 1064, 24, 2024], np.uint16, 16, -1024),
    "signed 16-bit, intercept 0": ([0, 40, -1000, 1000], np.int16, 16, 0),
    "unsigned 12-bit, intercept -1024": ([1024, 1064, 24, 2024], np.uint16, 12, -1024),
    "unsigned 12-bit wrapped, intercept 0": ([0, 40, 3096, 1000], np.uint16, 12, 0),
}


@pytest.mark.parametrize("stored, dtype, bits_stored, intercept", MONOCHROME1_FILES.values(), ids=MONOCHROME1_FILES)
def test_monochrome1_hu_are_the_rescale_of_the_stored_values(tmp_path, stored, dtype, bits_stored, intercept):
    # PS3.3 C.11.1: MONOCHROME1 only tells a viewer to show low values bright; HU ignore it.
    stored = np.array(stored, dtype=dtype).reshape(2, 2)
    path = write_ct(
        tmp_path / "ID_a.dcm",
        stored,
        bits_stored=bits_stored,
        RescaleIntercept=intercept,
        PhotometricInterpretation="MONOCHROME1",
    )
    header, hu = read_slice(path)
    assert header.photometric == "MONOCHROME1"
    np.testing.assert_array_equal(hu, [[0, 40], [-1000, 1000]])


def test_non_square_slice_is_padded_with_air_and_resized(tmp_path):
    hu = np.full((300, 400), 40, dtype=np.int16)
    square = fit_to_square(read_hu(write_hu(tmp_path / "ID_a.dcm", hu)), 256)
    assert square.shape == (256, 256) and square.dtype == np.float32
    # 50 rows of air above and below the 300 rows, scaled by 256/400: 32 rows each.
    np.testing.assert_allclose(square[:31], -1024, atol=1e-3)
    np.testing.assert_allclose(square[-31:], -1024, atol=1e-3)
    np.testing.assert_allclose(square[34:-34], 40, atol=1e-3)


def test_fit_to_square_enlarges_small_slices():
    hu = read_hu(get_testdata_file("CT_small.dcm"))
    large = fit_to_square(hu, 256)
    assert large.shape == (256, 256) and large.dtype == np.float32
    assert large.mean() == pytest.approx(hu.mean(), rel=0.01)


def test_non_dicom_file_is_unreadable(tmp_path):
    text = tmp_path / "ID_text.dcm"
    text.write_text("patient list, not an image\n" * 20)
    noise = tmp_path / "ID_noise.dcm"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    for path in (text, noise):
        assert "force=True" not in str(assert_error(path, "unreadable"))
        with pytest.raises(DicomReadError) as err:
            read_header(path)
        assert err.value.reason == "unreadable"


def test_missing_file_is_unreadable(tmp_path):
    assert_error(tmp_path / "ID_missing.dcm", "unreadable")


def test_file_truncated_inside_the_pixels_is_bad_pixel_data(tmp_path):
    path = write_hu(tmp_path / "ID_a.dcm")
    path.write_bytes(path.read_bytes()[:-100])
    assert read_header(path).rows == 32  # the header is intact
    assert_error(path, "bad_pixel_data")


def test_file_truncated_inside_the_header_is_an_error(tmp_path):
    path = write_hu(tmp_path / "ID_a.dcm")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DicomReadError):
        read_slice(path)


def test_file_without_pixel_data_is_no_pixel_data(tmp_path):
    path = write_hu(tmp_path / "ID_a.dcm")
    with config.disable_value_validation():
        ds = pydicom.dcmread(path)
        del ds.PixelData
        ds.save_as(path)
    assert_error(path, "no_pixel_data")


@pytest.mark.parametrize("shape", [(64, 64), (16, 32)])
def test_pixel_data_that_disagrees_with_rows_columns_is_bad_pixel_data(tmp_path, shape):
    path = write_hu(tmp_path / "ID_a.dcm", Rows=shape[0], Columns=shape[1])
    error = assert_error(path, "bad_pixel_data")
    assert f"{shape[0]}x{shape[1]}" in str(error)


def test_multi_frame_file_is_refused(tmp_path):
    two_frames = np.zeros((32, 16), np.int16)  # 2 frames of 16x16
    path = write_ct(tmp_path / "ID_a.dcm", two_frames, NumberOfFrames=2, Rows=16)
    assert_error(path, "multi_frame")
    with pytest.raises(DicomReadError, match="2 frames"):
        read_header(path)


def test_colour_file_is_refused(tmp_path):
    path = write_ct(
        tmp_path / "ID_a.dcm", np.zeros((8, 24), np.uint16), SamplesPerPixel=3, PhotometricInterpretation="RGB",
        Columns=8, PlanarConfiguration=0,
    )
    assert_error(path, "not_monochrome")


def test_compressed_file_without_a_decoder_names_the_packages_to_install(monkeypatch):
    # What pydicom reports when neither pylibjpeg-openjpeg nor gdcm is installed: no available plugin.
    monkeypatch.setattr(get_decoder(JPEG2000Lossless), "_available", {})
    error = assert_error(Path(get_testdata_file("J2K_pixelrep_mismatch.dcm")), "no_decoder")
    assert "pip install pylibjpeg pylibjpeg-openjpeg pylibjpeg-libjpeg" in str(error)
    assert "python-gdcm" in str(error)


def test_corrupt_compressed_pixels_are_bad_pixel_data(tmp_path):
    with config.disable_value_validation():
        ds = pydicom.dcmread(get_testdata_file("J2K_pixelrep_mismatch.dcm"))
        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(200)])
        ds.save_as(tmp_path / "ID_a.dcm")
    assert_error(tmp_path / "ID_a.dcm", "bad_pixel_data")


def test_read_error_survives_pickling_from_a_worker_process(tmp_path):
    path = tmp_path / "ID_a.dcm"
    path.write_text("not dicom")
    with pytest.raises(DicomReadError) as err:
        read_slice(path)
    copy = pickle.loads(pickle.dumps(err.value))
    assert (copy.path, copy.reason, str(copy)) == (path, "unreadable", str(err.value))


# Slice order on a tilted gantry.

TILT = math.radians(11)
ROW = (1.0, 0.0, 0.0)
COLUMN = (0.0, math.cos(TILT), math.sin(TILT))
NORMAL = np.array([0.0, -math.sin(TILT), math.cos(TILT)])


def tilted_series() -> list[tuple[float, ...]]:
    """IPP of 5 slices 5 mm apart along the tilted normal, each image origin shifted along its columns."""
    shifts = [0.0, -60.0, 30.0, -40.0, 50.0]
    origin = np.array([-125.0, -100.0, 20.0])
    return [tuple(origin + 5.0 * k * NORMAL + shift * np.array(COLUMN)) for k, shift in enumerate(shifts)]


def test_slice_position_is_the_distance_along_the_tilted_normal():
    positions = [slice_position(ipp, ROW + COLUMN) for ipp in tilted_series()]
    np.testing.assert_allclose(np.diff(positions), 5.0)


def test_sorting_by_slice_position_restores_the_order_plain_z_gets_wrong():
    series = tilted_series()
    shuffled = [series[i] for i in (3, 0, 4, 2, 1)]
    by_z = sorted(shuffled, key=lambda ipp: ipp[2])
    by_position = sorted(shuffled, key=lambda ipp: slice_position(ipp, ROW + COLUMN))
    assert by_position == series
    assert by_z != series


def test_slice_position_of_written_tilted_slices(tmp_path):
    first = slice_position(tilted_series()[0], ROW + COLUMN)
    for k, ipp in enumerate(tilted_series()):
        tags = {"ImagePositionPatient": list(ipp), "ImageOrientationPatient": [*ROW, *COLUMN]}
        path = write_hu(tmp_path / f"ID_{k}.dcm", **tags)
        assert read_header(path).position == pytest.approx(first + 5.0 * k)


@pytest.mark.parametrize(
    ("ipp", "iop"), [(None, ROW + COLUMN), ((0.0, 0.0, 1.0), None), ((0.0, 1.0), ROW + COLUMN)]
)
def test_slice_position_is_nan_without_position_tags(ipp, iop):
    assert math.isnan(slice_position(ipp, iop))


def test_missing_position_tags_give_nan_in_the_header(tmp_path):
    header = read_header(write_hu(tmp_path / "ID_a.dcm", ImagePositionPatient=None))
    assert isinstance(header, SliceHeader) and math.isnan(header.position)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_bigendian.dcm", "rtdose.dcm", "693_J2KI.dcm"])
def test_fast_tag_values_equal_pydicoms(name):
    """tag_value decodes the pixel tags itself (little and big endian, implicit and explicit VR); it must
    read what pydicom reads, for every tag it is used for."""
    from ich.data.dicom import _TAGS, tag_value

    path = get_testdata_file(name)
    fast, slow = pydicom.dcmread(path), pydicom.dcmread(path)
    for keyword in _TAGS:
        expected, got = slow.get(keyword), tag_value(fast, keyword)
        if expected is None or expected == "":
            assert got in (None, ""), keyword
        elif isinstance(expected, (int, float)) and not isinstance(expected, bool):
            assert float(got) == float(expected), keyword
        else:
            assert str(got) == str(expected), keyword


# Secondary captures (Modality OT or SC) converted from CT volumes: CT values without rescale or position tags.


def write_ot(path: Path, hu: np.ndarray, **tags) -> Path:
    """A slice as converters write volumes to DICOM: the HU stored as they are, Modality OT, no rescale, window or
    position tags."""
    return write_ct(path, hu.astype(np.int16), Modality="OT", SOPClassUID=SecondaryCaptureImageStorage,
                    RescaleSlope=None, RescaleIntercept=None, WindowCenter=None, WindowWidth=None,
                    ImagePositionPatient=None, ImageOrientationPatient=None, **tags)


def test_secondary_captures_are_skipped_unless_admitted_and_then_read_as_hu(tmp_path):
    path = write_ot(tmp_path / "ot.dcm", KNOWN_HU)
    assert "leave it out, or admit it with data.modalities=[CT,OT]" in str(assert_error(path, "not_ct"))
    header, hu = read_slice(path, modalities=["CT", "OT"])
    np.testing.assert_array_equal(hu, KNOWN_HU)  # no rescale tags: the stored values are the HU
    assert math.isnan(header.position) and math.isnan(header.window_center)


def test_admitted_slices_without_positions_are_ordered_by_instance_number_or_file_name(tmp_path):
    """The index says what each series' order rests on; file names sort with their digits as numbers."""
    folder = tmp_path / "converted"
    folder.mkdir()
    for name, instance in (("a_x", 3), ("a_y", 1), ("a_z", 2)):  # file names against the instance order
        write_ot(folder / f"{name}.dcm", KNOWN_HU + instance, InstanceNumber=instance, SeriesInstanceUID="ID_a")
    for number in (10, 2, 1):  # no InstanceNumber either
        write_ot(folder / f"b_slice{number}.dcm", KNOWN_HU, SeriesInstanceUID="ID_b")
    write_hu(folder / "ct.dcm")
    index, summary, _ = load_or_build_index(folder, None, None, tmp_path / "cache", modalities=["CT", "OT"])
    assert summary.read == 7 and summary.skipped == {}
    series = {uid: index[index["series"] == pseudonym(uid)].sort_values("slice_index") for uid in ("ID_a", "ID_b")}
    assert series["ID_a"]["image_id"].tolist() == ["a_y", "a_z", "a_x"] and (series["ID_a"]["order"] == "instance").all()
    assert series["ID_b"]["image_id"].tolist() == ["b_slice1", "b_slice2", "b_slice10"]
    assert (series["ID_b"]["order"] == "file").all()
    assert index.loc[index["image_id"] == "ct", "order"].tolist() == ["position"]
    np.testing.assert_array_equal(read_hu(series["ID_a"]["path"].iloc[0]), KNOWN_HU + 1)

    _, summary, index_folder = load_or_build_index(folder, None, None, tmp_path / "cache")  # the default: CT only
    assert summary.read == 1 and summary.skipped == {"not_ct": 6}
    details = pd.read_csv(index_folder / "skipped.csv")["detail"]
    assert details.str.contains(r"admit it with data.modalities=\[CT,OT\]").all()
