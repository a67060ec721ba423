"""The synthetic phantom: RSNA layout, real DICOM files, honest labels and the documented quirks."""

import dataclasses
import json
import math
import re
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from ich.core.tasks import LABELS, SUBTYPES
from ich.data.datamodule import phantom_root
from ich.data.phantom import QUIRK_KINDS, SITES, generate
from ich.phantom import main

# RSNA's `ID_...` UIDs are invalid on purpose; pydicom says so on every read.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")

SMALL = dict(patients=4, slices=6, size=64, seed=0)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("phantom") / "nested" / "rsna"
    return out, generate(out, **SMALL)


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> tuple[Path, dict]:
    """The same patients without quirks: the true HU of every quirk file."""
    out = tmp_path_factory.mktemp("clean")
    return out, generate(out, **SMALL, quirks=False)


def csv_rows(root: Path) -> list[tuple[str, int]]:
    lines = (root / "stage_2_train.csv").read_text().splitlines()
    assert lines[0] == "ID,Label"
    return [(row.split(",")[0], int(row.split(",")[1])) for row in lines[1:]]


def labels_by_image(root: Path) -> dict[str, dict[str, int]]:
    table: dict[str, dict[str, int]] = {}
    for key, value in set(csv_rows(root)):
        image_id, label = key.rsplit("_", 1)
        table.setdefault(image_id, {})[label] = value
    return table


def read(root: Path, image_id: str) -> pydicom.Dataset:
    return pydicom.dcmread(root / "stage_2_train" / f"{image_id}.dcm")


def hu(ds: pydicom.Dataset) -> np.ndarray:
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def quirk_ids(summary: dict) -> set[str]:
    return {i for kind, ids in summary["quirks"].items() if kind != "duplicate_rows" for i in ids}


def blood_like(image: np.ndarray) -> np.ndarray:
    """Pixels inside the skull, not touching bone, whose 3x3 mean is at least 50 HU (fresh blood)."""
    bone = image > 300
    walled = np.ones_like(bone)
    for axis in (0, 1):
        for flip in (False, True):
            b = np.flip(bone, axis) if flip else bone
            seen = np.maximum.accumulate(b, axis=axis)
            walled &= np.flip(seen, axis) if flip else seen
    inside = np.pad(walled & ~bone, 1)
    padded = np.pad(image, 1)
    shifts = [(dy, dx) for dy in range(3) for dx in range(3)]
    rows, cols = image.shape
    interior = np.logical_and.reduce([inside[dy : dy + rows, dx : dx + cols] for dy, dx in shifts])
    mean = sum(padded[dy : dy + rows, dx : dx + cols] for dy, dx in shifts) / 9
    return np.where(interior & (mean >= 50), mean, 0.0)


def test_writes_the_kaggle_layout(small):
    root, summary = small
    rows = csv_rows(root)
    table = labels_by_image(root)
    files = {p.stem for p in (root / "stage_2_train").glob("*.dcm")}
    assert len(files) == summary["files"] == SMALL["patients"] * SMALL["slices"]
    assert set(table) == files  # every labelled image has its file, and no file lacks labels
    assert all(sorted(labels) == sorted(LABELS) for labels in table.values())
    assert all(re.fullmatch(r"ID_[0-9a-f]{9}", image_id) for image_id in files)
    assert len(set(rows)) == len({key for key, _ in rows})  # repeated rows never disagree
    repeated = Counter(key for key, _ in rows) - Counter({key: 1 for key, _ in rows})
    assert {key.rsplit("_", 1)[0] for key in repeated} == set(summary["quirks"]["duplicate_rows"])
    assert len(rows) == 6 * len(table) + sum(repeated.values())  # whole images repeated, as in the real file


def test_same_seed_same_bytes_other_seed_other_data(small, tmp_path):
    root, summary = small
    again = generate(tmp_path / "again", **SMALL)
    other = generate(tmp_path / "other", **{**SMALL, "seed": 1})
    for name in ["stage_2_train.csv", *(f"stage_2_train/{i}.dcm" for ids in summary["series"].values() for i in ids)]:
        assert (root / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    assert again == {**summary, "out_dir": str(tmp_path / "again")}
    assert not set(other["series"]) & set(summary["series"])
    ours, theirs = (next(iter(s["series"].values()))[2] for s in (summary, other))  # the third slice of each
    assert read(tmp_path / "other", theirs).PixelData != read(root, ours).PixelData


def test_files_are_rsna_like_dicom(small):
    root, summary = small
    unreadable = set(summary["quirks"]["unreadable"])
    for patient_id, image_ids in summary["series"].items():
        datasets = [read(root, i) for i in image_ids]  # no force=True: a proper preamble and file meta
        assert len({ds.StudyInstanceUID for ds in datasets}) == len({ds.SeriesInstanceUID for ds in datasets}) == 1
        for image_id, ds in zip(image_ids, datasets):
            assert ds.SOPInstanceUID == image_id and ds.PatientID == patient_id
            assert ds.Modality == "CT" and ds.PatientName and ds.PatientBirthDate
            assert "InstanceNumber" not in ds and "SliceLocation" not in ds
            assert ds.SliceThickness == 5 and ds.Rows * float(ds.PixelSpacing[0]) >= 200
            if image_id not in unreadable:
                assert ds.pixel_array.shape == (ds.Rows, ds.Columns)


def test_labels_are_consistent_and_cover_every_subtype(tmp_path):
    summary = generate(tmp_path, patients=40, slices=12, size=64, seed=0, quirks=False)
    table = labels_by_image(tmp_path)
    assert all(t["any"] == max(t[s] for s in SUBTYPES) for t in table.values())
    counts = {label: sum(t[label] for t in table.values()) for label in LABELS}
    assert counts == summary["positives"]
    assert all(counts[s] > 0 for s in SUBTYPES), counts
    assert 0.25 <= counts["any"] / len(table) <= 0.5


def test_blood_is_bright_only_on_positive_slices(tmp_path):
    summary = generate(tmp_path, patients=10, slices=8, size=128, seed=1)
    skip = quirk_ids(summary)
    seen = Counter()
    for image_id, labels in labels_by_image(tmp_path).items():
        if image_id in skip:
            continue
        blood = blood_like(hu(read(tmp_path, image_id)))
        if labels["any"]:
            assert 50 <= blood.max() <= 90, f"{image_id} is labelled positive but shows no blood"
            seen.update(s for s in SUBTYPES if labels[s])
        else:
            assert not blood.any(), f"{image_id} is labelled negative but has a bright cluster"
    assert all(seen[s] for s in SUBTYPES), seen


def test_every_quirk_is_listed_and_only_changes_the_encoding(small, clean):
    _, summary = small
    _, truth_summary = clean
    assert set(summary["quirks"]) == set(QUIRK_KINDS) and all(summary["quirks"].values())
    assert all(not ids for ids in truth_summary["quirks"].values())
    assert truth_summary["series"] == summary["series"] and truth_summary["positives"] == summary["positives"]


def test_12bit_wrap_is_undone_by_the_rsna_fix_only(small, clean):
    (root, summary), (truth_root, _) = small, clean
    for image_id in summary["quirks"]["wrap_12bit"]:
        ds, true_hu = read(root, image_id), hu(read(truth_root, image_id))
        assert (ds.BitsStored, ds.PixelRepresentation) == (12, 0) and float(ds.RescaleIntercept) > -100
        p = ds.pixel_array.astype(np.int32)
        np.testing.assert_array_equal((p + 1000) % 4096 - 1000, np.clip(true_hu, -1000, 3095))
        assert hu(ds).max() > 3000  # read naively, air comes out as dense bone


def test_monochrome1_files_differ_only_in_the_photometric_tag(small, clean):
    (root, summary), (truth_root, _) = small, clean
    for image_id in summary["quirks"]["monochrome1"]:
        ds, truth = read(root, image_id), read(truth_root, image_id)
        assert (ds.PhotometricInterpretation, truth.PhotometricInterpretation) == ("MONOCHROME1", "MONOCHROME2")
        assert {e.keyword for e in ds if e.tag not in truth or truth[e.tag].value != e.value} == {
            "PhotometricInterpretation"
        }
        # HU are the rescale of the stored values, whatever the display polarity
        np.testing.assert_array_equal(hu(ds), hu(truth))


def test_files_without_rescale_tags_store_hu(small, clean):
    (root, summary), (truth_root, _) = small, clean
    for image_id in summary["quirks"]["no_rescale"]:
        ds = read(root, image_id)
        assert "RescaleSlope" not in ds and "RescaleIntercept" not in ds
        np.testing.assert_array_equal(ds.pixel_array, hu(read(truth_root, image_id)))


def test_odd_window_tags_and_a_non_square_image(small):
    root, summary = small
    quirks = summary["quirks"]
    centre = {kind: read(root, ids[0]).WindowCenter for kind, ids in quirks.items() if kind.startswith("window")}
    first, second = (str(c) for c in centre["window_multivalue"])  # like RSNA's [00040, 00040]
    assert first == second and first.startswith("000")
    assert str(centre["window_zero_padded"]).startswith("000")
    assert float(centre["window_non_integer"]) % 1 != 0
    (wide,) = quirks["non_square"]
    rows, cols = read(root, wide).pixel_array.shape
    assert rows != cols


def test_one_file_is_unreadable_yet_labelled(small):
    root, summary = small
    (broken,) = summary["quirks"]["unreadable"]
    assert broken in labels_by_image(root)
    ds = read(root, broken)  # the header still reads, as with RSNA's ID_6431af929
    assert ds.SOPInstanceUID == broken
    with pytest.raises(ValueError):
        ds.pixel_array


def test_without_quirks_every_file_is_plain(clean):
    root, summary = clean
    assert len(csv_rows(root)) == 6 * summary["files"]
    padded = 0
    for image_id in [i for ids in summary["series"].values() for i in ids]:
        ds = read(root, image_id)
        assert (ds.BitsStored, ds.PixelRepresentation, ds.PhotometricInterpretation) == (16, 1, "MONOCHROME2")
        assert ds.Rows == ds.Columns and float(ds.RescaleIntercept) == -1024
        assert float(ds.WindowCenter) in (36, 40)
        corner = hu(ds)[: ds.Rows // 8, : ds.Columns // 8]
        if corner.min() < -1500:  # padded outside the circular field of view, as some scanners do
            assert len(np.unique(corner)) == 1 and corner[0, 0] in (-2000, -3024)
            padded += 1
        else:
            assert abs(corner.mean() + 1000) < 5  # air
    assert 0 < padded < summary["files"]


def test_slice_order_comes_from_the_position_on_the_normal(small):
    root, summary = small
    assert summary["tilted"]
    for patient_id in summary["tilted"]:
        truth = summary["series"][patient_id]
        by_name = sorted(truth)
        datasets = {i: read(root, i) for i in by_name}
        iop = np.array(datasets[by_name[0]].ImageOrientationPatient, dtype=float)
        assert abs(iop[5]) > 0.15  # a tilted gantry, around 11-15 degrees
        normal = np.cross(iop[:3], iop[3:])
        ipp = {i: np.array(ds.ImagePositionPatient, dtype=float) for i, ds in datasets.items()}
        position = {i: float(np.dot(p, normal)) for i, p in ipp.items()}
        assert sorted(by_name, key=position.get) == truth
        assert by_name != truth  # file names do not give the order away
        np.testing.assert_allclose(np.diff([position[i] for i in truth]), 5.0, atol=0.01)


def test_command_line_prints_the_summary(tmp_path, capsys):
    summary = main(["--out", str(tmp_path), "--patients", "2", "--slices", "3", "--size", "32", "--no-quirks"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["files"] == summary["files"] == 6
    assert len(list((tmp_path / "stage_2_train").glob("*.dcm"))) == 6


def test_too_small_an_image_is_refused(tmp_path):
    with pytest.raises(ValueError, match="size"):
        generate(tmp_path, patients=1, slices=1, size=16)


# --- sites: the same heads on other scanners, each property measured from the written files -----------------

SITE_PHANTOM = dict(patients=6, slices=4, size=256, seed=0, quirks=False)


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> dict[str, Path]:
    """The same six heads imaged at each site."""
    roots = {}
    for site in SITES:
        roots[site] = tmp_path_factory.mktemp(f"site{site}")
        generate(roots[site], **SITE_PHANTOM, site=site)
    return roots


def inside_skull(image: np.ndarray, spacing: float) -> np.ndarray:
    """Per pixel, its depth in mm under the skull's inner table (0 outside the skull), found from the HU alone."""
    bone = (image > 300).astype(np.uint8)
    _, parts = cv2.connectedComponents(1 - bone, connectivity=4)
    outside = np.unique(np.concatenate([parts[0], parts[-1], parts[:, 0], parts[:, -1]]))
    inside = ~np.isin(parts, outside) & (bone == 0)
    return cv2.distanceTransform(inside.astype(np.uint8), cv2.DIST_L2, 5) * spacing


def site_figures(root: Path) -> dict[str, list[float]]:
    """What a physicist would measure on each slice with a head (over 30 cm2 of brain): noise SD and the
    correlation of neighbouring pixels' noise in uniform deep brain, the mean brain HU 2-5 mm under the table and
    deeper than 12 mm on negative slices, and the brightest 5x5-median brain HU of every positive and negative slice."""
    labels = labels_by_image(root)
    figures: dict[str, list[float]] = {key: [] for key in ("sd", "corr", "rim", "positive", "negative")}
    for path in sorted((root / "stage_2_train").glob("*.dcm")):
        ds = pydicom.dcmread(path)
        image, spacing = hu(ds), float(ds.PixelSpacing[0])
        depth = inside_skull(image, spacing)
        if (depth > 0).sum() * spacing**2 < 3000:
            continue
        side = max(6, round(4 / spacing))  # 4 mm blocks wholly 8 mm deep or more; the calmer half is uniform tissue
        blocks = [image[y : y + side, x : x + side] for y in range(0, image.shape[0] - side, side)
                  for x in range(0, image.shape[1] - side, side) if (depth[y : y + side, x : x + side] > 8).all()]
        residuals = sorted((block - block.mean() for block in blocks), key=np.std)[: max(1, len(blocks) // 2)]
        figures["sd"].append(float(np.median([r.std() for r in residuals[len(residuals) // 2 :]])))
        figures["corr"].append(float(np.median([(r[:, 1:] * r[:, :-1]).mean() / r.var() for r in residuals])))
        positive = labels[path.stem]["any"]
        if not positive:
            figures["rim"].append(float(image[(depth > 2) & (depth < 5)].mean() - image[depth > 12].mean()))
        brightest = cv2.medianBlur(image.astype(np.float32), 5)[depth > 3].max()
        figures["positive" if positive else "negative"].append(float(brightest))
    return figures


def test_site_a_is_the_phantom_as_before(small, tmp_path):
    root, _ = small
    again = tmp_path / "a"
    generate(again, **SMALL, site="A")
    assert all((again / "stage_2_train" / p.name).read_bytes() == p.read_bytes()
               for p in (root / "stage_2_train").glob("*.dcm"))


def test_each_site_writes_its_geometry_into_the_headers(sites):
    for name, root in sites.items():
        site = SITES[name]
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in (root / "stage_2_train").glob("*.dcm")]
        spacings = {round(float(ds.PixelSpacing[0]) * SITE_PHANTOM["size"]) for ds in headers}
        assert spacings <= {round(fov) for fov in site.fields_of_view}, (name, spacings)
        assert {float(ds.SliceThickness) for ds in headers} == {site.thickness}
        # the gantry tilt is the angle of the column direction out of the axial plane
        tilts = {round(math.degrees(math.asin(-float(ds.ImageOrientationPatient[5]))), 1) for ds in headers}
        tilted = {t for t in tilts if t}
        assert all(site.tilt[0] <= t <= site.tilt[1] for t in tilted), (name, tilts)
        assert (0.0 in tilts) == (site.tilted < 1) and bool(tilted) == (site.tilted > 0), (name, tilts)
    spacing = {name: float(pydicom.dcmread(next((root / "stage_2_train").glob("*.dcm"))).PixelSpacing[0])
               for name, root in sites.items()}
    assert spacing["C"] < spacing["A"] < spacing["B"]


def test_each_site_has_its_noise_kernel_blood_and_beam_hardening(sites):
    figures = {name: site_figures(root) for name, root in sites.items()}
    for name, site in SITES.items():
        sd = np.median(figures[name]["sd"])
        assert site.noise[0] - 0.8 <= sd <= site.noise[1] + 0.5, (name, sd)
    corr = {name: np.median(f["corr"]) for name, f in figures.items()}
    # a sharp kernel anti-correlates neighbouring pixels' noise, a smooth one correlates it
    assert corr["C"] < corr["A"] - 0.08 and corr["B"] > corr["A"] + 0.3, corr
    # acute blood (A, C) is brighter than any brain; older blood (B) is barely brighter than grey matter
    for name in "AC":
        assert min(figures[name]["positive"]) >= 60 > max(figures[name]["negative"]) + 10, name
    assert max(figures["B"]["positive"]) <= 52, figures["B"]["positive"]
    rim = {name: np.mean(f["rim"]) for name, f in figures.items()}
    # a beam-hardening rim of h HU fading over 5 mm adds about h/2 between 2 and 5 mm deep
    assert all(rim[name] - rim["A"] > 0.25 * SITES[name].beam_hardening for name in "BC"), rim


def test_an_unknown_site_is_refused(tmp_path):
    with pytest.raises(ValueError, match="data.phantom.site"):
        generate(tmp_path, patients=1, slices=1, size=32, site="Z")


def test_each_site_has_its_own_cache_folder_and_a_keeps_its_own(tmp_path, monkeypatch):
    settings = dict(patients=2, slices=3, size=32, seed=0, quirks=True)
    before = phantom_root(tmp_path, settings)
    assert phantom_root(tmp_path, {**settings, "site": "A"}) == before
    b = phantom_root(tmp_path, {**settings, "site": "B"})
    assert b.name.startswith(f"{before.name}-site-B-") and b != phantom_root(tmp_path, {**settings, "site": "C"})
    # a profile changed in code (as B and C once swapped) is written afresh, not read from the old profile's files
    monkeypatch.setitem(SITES, "B", dataclasses.replace(SITES["B"], beam_hardening=0.0))
    assert phantom_root(tmp_path, {**settings, "site": "B"}) != b
