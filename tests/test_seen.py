"""A model knows what it has not seen: every output names its training source, and a study unlike its training
series is flagged out of distribution, with the figure, its value and the training range.

The model is an untrained checkpoint of the small phantom (its figures are what matters, not its weights). The
studies are written here with plain pydicom: phantom series of the same settings, the same series made thicker,
with another pixel spacing and with shifted HU, and pydicom's real CT slice; the expected figures are computed
from the files with numpy, or by hand.
"""

import json
import math
import shutil
from copy import deepcopy

import numpy as np
import pandas as pd
import pydicom
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pydicom import config
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from conftest import PHANTOM, SMALL_PHANTOM, compose_config, make_datamodule
from ich.data.datamodule import phantom_root
from ich.data.phantom import generate, generate_images
from ich.data.seen import (UNKNOWN_SOURCE, TrainingSource, flag, seen_ranges, series_figures, slice_spacing,
                           training_source)
from ich.evaluate import run as evaluate_run
from ich.inference.answer import load_predictor, predict_study
from ich.inference.outputs import Outputs
from ich.inference.study import scan_folder
from ich.node.dicom_results import ModelIdentity, sr_content
from ich.predict import run as predict_run
from ich.training.module import ICHLitModule

pytestmark = pytest.mark.xdist_group("seen")

SLICES = 6
STUDIES = ("same", "thick", "spacing", "shifted", "real")


# --- the checkpoint and the studies -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantom_model(cache_dir, tmp_path_factory):
    """An untrained checkpoint of the small phantom, with what a data module records of its training data."""
    folder = tmp_path_factory.mktemp("model")
    dm = make_datamodule(cache_dir, folder)
    trained = OmegaConf.to_container(compose_config("train", [*SMALL_PHANTOM, f"data.cache_dir={cache_dir}",
                                                              "data.image_size=64"]).data, resolve=True)
    model = ICHLitModule(task="binary", backbone="test_resnet", in_chans=dm.num_channels, inputs=dm.inputs,
                         data=trained)
    path = folder / "phantom.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "pytorch-lightning_version": pl.__version__}, path)
    return path, dm


@pytest.fixture(scope="module")
def old_model(phantom_model, tmp_path_factory):
    """The same checkpoint as one written before ich recorded its training source and figures."""
    checkpoint = torch.load(phantom_model[0], map_location="cpu", weights_only=True)
    for key in ("trained_on", "seen"):
        del checkpoint["hyper_parameters"]["inputs"][key]
    path = tmp_path_factory.mktemp("old") / "old.ckpt"
    torch.save(checkpoint, path)
    return path


def save(ds, path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with config.disable_value_validation():  # the phantom's RSNA-style `ID_...` UIDs are invalid on purpose
        ds.save_as(path, enforce_file_format=True)


def as_study(slices, name, root, change=lambda ds, k: None) -> None:
    """`slices` as a new study and series under root/name, each slice changed by `change(ds, k)` first."""
    study, series = generate_uid(), generate_uid()
    for k, original in enumerate(slices):
        ds = deepcopy(original)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber = study, series, 2
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        change(ds, k)
        save(ds, root / name / f"IM{k:05d}")


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """One folder per study: a phantom series of the training settings (another seed), and that series 10 mm apart,
    at twice the pixel spacing, and 200 HU higher; and pydicom's real CT slice as a 6-slice series."""
    with config.disable_value_validation():  # the phantom's RSNA-style `ID_...` UIDs are invalid on purpose
        return write_studies(tmp_path_factory)


def write_studies(tmp_path_factory):
    phantom = tmp_path_factory.mktemp("phantom")
    summary = generate(phantom, patients=1, slices=SLICES, size=PHANTOM["size"], seed=7, quirks=False)
    (ids,) = summary["series"].values()
    slices = [pydicom.dcmread(phantom / "stage_2_train" / f"{i}.dcm") for i in ids]
    root = tmp_path_factory.mktemp("studies")
    start = np.array([float(v) for v in slices[0].ImagePositionPatient])
    step = np.array([float(v) for v in slices[1].ImagePositionPatient]) - start

    def thick(ds, k):
        ds.ImagePositionPatient = [float(v) for v in start + 2 * k * step]
        ds.SliceThickness = 10

    def spacing(ds, k):
        ds.PixelSpacing = [2 * float(v) for v in ds.PixelSpacing]

    def shifted(ds, k):
        ds.RescaleIntercept = float(ds.RescaleIntercept) + 200

    for name, change in (("same", lambda ds, k: None), ("thick", thick), ("spacing", spacing), ("shifted", shifted)):
        as_study(slices, name, root, change)
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    position = [float(v) for v in ct.ImagePositionPatient]

    def stacked(ds, k):
        ds.ImagePositionPatient = [*position[:2], position[2] + 5.0 * k]

    as_study([ct] * SLICES, "real", root, stacked)
    return root, slices, ct


def predict(checkpoint, folder, output_dir) -> pd.DataFrame:
    cfg = compose_config("predict", [f"ckpt_path={checkpoint}", f"input={folder}", f"output_dir={output_dir}",
                                     "min_slices=4", "heatmaps=0"])
    return predict_run(cfg)


@pytest.fixture(scope="module")
def predicted(phantom_model, studies, tmp_path_factory):
    """predict.py on the five studies, each its own folder; studies.csv by study folder name."""
    output_dir = tmp_path_factory.mktemp("predicted")
    predict(phantom_model[0], studies[0], output_dir)
    return output_dir, by_name(output_dir, studies[0])


def by_name(output_dir, root) -> pd.DataFrame:
    """studies.csv indexed by the folder each study was written to (its study key is a pseudonym)."""
    table = pd.read_csv(output_dir / "studies.csv")
    key_of = {name: scan_folder(root / name, 1).studies[0].key for name in STUDIES}
    return table.set_index("study").loc[[key_of[name] for name in STUDIES]].set_axis(list(STUDIES))


def head_hu(ds) -> np.ndarray:
    """The HU of a slice's head (denser than -500 HU), straight from its pixel data."""
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return hu[hu > -500]


# --- the checkpoint records what it was trained on -------------------------------------------------------------


def test_the_checkpoint_records_its_phantom_and_the_ranges_of_its_training_series(phantom_model, cache_dir):
    path, dm = phantom_model
    inputs = torch.load(path, weights_only=True)["hyper_parameters"]["inputs"]
    assert inputs["trained_on"] == {"data": "phantom", "synthetic": True, "phantom": PHANTOM}
    seen = inputs["seen"]
    train = dm.index[dm.index["patient"].isin(dm.tables["train"]["patient"])]
    assert seen["series"] == train["series"].nunique()
    # every phantom series is 5 mm apart: the range is 5 mm widened by the 0.5 mm floor
    spacing = seen["figures"]["slice_spacing_mm"]
    assert (spacing["low"], spacing["high"]) == pytest.approx((4.5, 5.5), abs=1e-3)
    # the field of view of each training series from its files (PixelSpacing x 128 pixels), then its percentiles
    fields = [float(pydicom.dcmread(group["path"].iloc[0], stop_before_pixels=True).PixelSpacing[0]) * PHANTOM["size"]
              for _, group in train.groupby("series")]
    low, high = np.percentile(fields, [1, 99])
    margin = max(0.25 * (high - low), 15.0)
    assert seen["figures"]["field_of_view_mm"] == pytest.approx(
        {"p01": low, "p99": high, "low": low - margin, "high": high + margin}, abs=1e-3)


def test_a_range_spans_the_1st_to_99th_percentile_widened_by_a_quarter_or_the_floor():
    figures = pd.DataFrame({"head_hu_median": np.arange(101.0), "slice_spacing_mm": 5.0})
    ranges = seen_ranges(figures)["figures"]
    assert ranges["head_hu_median"] == pytest.approx({"p01": 1.0, "p99": 99.0, "low": -23.5, "high": 123.5})
    assert ranges["slice_spacing_mm"] == pytest.approx({"p01": 5.0, "p99": 5.0, "low": 4.5, "high": 5.5})
    assert "field_of_view_mm" not in ranges  # no column, no range: never checked


def test_slice_spacing_is_the_median_step_of_positions_in_slice_order():
    assert slice_spacing(np.array([0.0, 5.0, 10.0, 20.0, 25.0])) == 5.0
    assert math.isnan(slice_spacing(np.array([np.nan, np.nan, 3.0])))
    slices = pd.DataFrame({"series": ["a"] * 3 + ["b"] * 2, "slice_index": [2, 0, 1, 0, 1],
                           "position": [10.0, 0.0, 5.0, 0.0, 2.5], "field_of_view_mm": [240.0, 250.0, 260.0, 1, 3]})
    figures = series_figures(slices)
    assert figures.loc["a"].to_dict() == {"slice_spacing_mm": 5.0, "field_of_view_mm": 250.0}
    assert figures.loc["b"].to_dict() == {"slice_spacing_mm": 2.5, "field_of_view_mm": 2.0}


# --- predict.py ---------------------------------------------------------------------------------------------


def test_studies_csv_names_the_phantom_in_every_row(predicted):
    _, table = predicted
    assert table.columns[0] == "training_source"
    assert table["training_source"].str.startswith("Trained on the synthetic phantom").all()
    assert table["training_source"].str.contains("its verdict on a real scan means nothing").all()


def test_a_study_like_the_training_series_is_not_flagged(predicted):
    _, table = predicted
    assert table.loc["same", "ood"] == 0 and pd.isna(table.loc["same", "ood_reason"])


def test_thick_slices_another_pixel_spacing_shifted_hu_and_a_real_ct_are_flagged_naming_the_figure(predicted,
                                                                                                  studies):
    _, table = predicted
    _, slices, ct = studies
    assert (table.loc[["thick", "spacing", "shifted", "real"], "ood"] == 1).all()
    assert "slice_spacing_mm 10 outside training's 4.5 to 5.5" in table.loc["thick", "ood_reason"]
    field = 2 * float(slices[0].PixelSpacing[0]) * PHANTOM["size"]  # twice the spacing, twice the field
    assert f"field_of_view_mm {field:.3g} outside" in table.loc["spacing", "ood_reason"]
    # the median HU of the shifted heads, from the files (the sampled median lies within a few HU of it)
    shifted = np.median(np.concatenate([head_hu(ds) for ds in slices])) + 200
    value = float(table.loc["shifted", "ood_reason"].split("head_hu_median ")[1].split()[0])
    assert value == pytest.approx(shifted, abs=10)
    assert f"field_of_view_mm {float(ct.PixelSpacing[0]) * ct.Rows:.3g} outside" in table.loc["real", "ood_reason"]
    # only what was changed: the thick copy's HU and field are its source's
    assert "head_hu_median" not in table.loc["thick", "ood_reason"]
    assert "field_of_view_mm" not in table.loc["thick", "ood_reason"]


def test_series_csv_carries_each_series_figures(predicted, studies):
    output_dir, _ = predicted
    series = pd.read_csv(output_dir / "series.csv")
    assert sorted(series["slice_spacing_mm"].round(3)) == [5.0] * 3 + [5.0, 10.0]  # the real CT stacked 5 mm apart
    assert {"field_of_view_mm", "head_hu_median", "head_brain_fraction", "brain_noise_hu", "ood"} <= set(series)


def test_the_report_says_phantom_first_in_red_and_flags_the_studies(predicted):
    output_dir, _ = predicted
    page = (output_dir / "report.html").read_text()
    banner = page.index('<p class="banner synthetic">Trained on the synthetic phantom')
    assert banner < page.index("What was read")
    assert page.count('<p class="ood">Out of distribution: ') == 4
    assert "slice_spacing_mm 10 outside training" in page
    assert "4 of 5 studies read lie outside the ranges" in page


def test_the_flag_never_changes_a_probability_and_an_old_checkpoint_says_unknown(predicted, old_model, studies,
                                                                                 tmp_path):
    _, table = predicted
    predict(old_model, studies[0], tmp_path)
    older = by_name(tmp_path, studies[0])
    probabilities = [column for column in table if column.startswith(("prob_", "called_", "threshold_"))]
    pd.testing.assert_frame_equal(older[probabilities], table[probabilities])
    assert (older["training_source"] == UNKNOWN_SOURCE).all()
    assert older["ood"].isna().all()
    assert older["ood_reason"].str.startswith("unknown: this checkpoint predates ich recording").all()
    page = (tmp_path / "report.html").read_text()
    assert '<p class="banner unknown">Training source unknown' in page


def test_the_dicom_nodes_report_says_the_source_and_the_flag(phantom_model, studies, tmp_path):
    model = load_predictor(str(phantom_model[0]), 16)
    study = scan_folder(studies[0] / "thick", 1).studies[0]
    result = predict_study(study, model, 4)
    content = sr_content(result, model, Outputs(model, tmp_path, False, 0), ModelIdentity("test_resnet", "0", "binary"),
                         None)
    said = {item.ConceptNameCodeSequence[0].CodeValue: str(item.get("TextValue", "")) for item in content.ContentSequence}
    assert said["TRAINING-SOURCE"].startswith("Trained on the synthetic phantom")
    assert said["OOD"].startswith("yes: slice_spacing_mm 10 outside")
    assert list(said).index("TRAINING-SOURCE") == 1  # right after the notice


# --- evaluate.py -------------------------------------------------------------------------------------------


def evaluate(checkpoint, output_dir, *overrides):
    overrides = [f"ckpt_path={checkpoint}", "bootstrap=20", "accelerator=cpu", *overrides]
    metrics = evaluate_run(compose_config("evaluate", [*overrides, f"output_dir={output_dir}"]), overrides)
    return metrics, json.loads((output_dir / "metrics.json").read_text())


def test_evaluate_names_the_phantom_first_and_flags_no_series_of_its_test_patients(phantom_model, tmp_path):
    metrics, written = evaluate(phantom_model[0], tmp_path)
    assert next(iter(written)) == "training_source"
    assert written["training_source"].startswith("Trained on the synthetic phantom")
    page = (tmp_path / "report.html").read_text()
    assert page.index('<p class="banner synthetic">') < page.index("What was evaluated")
    flags = pd.read_csv(tmp_path / "series_ood.csv")
    assert len(flags) == metrics["data/series_test"] > 0
    assert metrics["data/ood_series"] == 0 and (flags["ood"] == 0).all()
    assert "0 of" in page and "series outside the training ranges" in page


def test_evaluate_on_another_source_measures_how_often_the_flag_fires(phantom_model, cache_dir, tmp_path):
    """The training phantom's files 10 mm apart: a labelled source of another slice spacing, evaluated whole."""
    _, dm = phantom_model
    root = tmp_path / "thick"
    (root / "stage_2_train").mkdir(parents=True)
    shutil.copy(phantom_root(cache_dir, PHANTOM) / "stage_2_train.csv", root / "stage_2_train.csv")
    for path, rank in zip(dm.index["path"], dm.index["slice_index"]):  # each series' slices 5 mm further apart
        ds = pydicom.dcmread(path)
        normal = np.cross(np.array(ds.ImageOrientationPatient[:3], float), np.array(ds.ImageOrientationPatient[3:], float))
        ds.ImagePositionPatient = [float(v) for v in np.array(ds.ImagePositionPatient, float) + 5.0 * rank * normal]
        save(ds, root / "stage_2_train" / f"{ds.SOPInstanceUID}.dcm")
    metrics, _ = evaluate(phantom_model[0], tmp_path / "out", "data=rsna", f"data.root={root}",
                          f"data.cache_dir={cache_dir}")
    flags = pd.read_csv(tmp_path / "out" / "series_ood.csv")
    assert metrics["data/ood_series_share"] == 1.0 and len(flags) == dm.index["series"].nunique()
    assert flags["ood_figures"].eq("slice_spacing_mm").all()


def test_evaluate_with_an_old_checkpoint_says_unknown_and_does_not_crash(old_model, tmp_path):
    metrics, written = evaluate(old_model, tmp_path)
    assert written["training_source"] == UNKNOWN_SOURCE
    assert metrics["data/ood_series"] is None or math.isnan(metrics["data/ood_series"])
    assert "unknown: this checkpoint predates" in (tmp_path / "report.html").read_text()


def test_a_model_of_image_folders_names_them_and_leaves_its_flag_unknown(cache_dir, tmp_path):
    """PNG slices have no HU, positions or field of view: nothing to compare a study with, and said so."""
    generate_images(tmp_path, patients=6, slices=3, size=32)
    dm = make_datamodule(cache_dir, tmp_path, source="images", root=str(tmp_path), labels=str(tmp_path / "labels.csv"),
                         image_size=32, encoding="window", encoding_window=[40, 80])
    inputs = dm.inputs
    assert training_source(inputs) == TrainingSource("Trained on data=images (PNG/JPG slices).", "real")
    assert inputs["seen"]["figures"] == {}
    ood, reason = flag([("", {"slice_spacing_mm": 1.0, "field_of_view_mm": 1.0})], inputs)
    assert math.isnan(ood) and reason.startswith("unknown: its training data (data=images) gave no figures")


@pytest.mark.slow
def test_the_flag_fires_across_phantom_sites_and_not_within_one(phantom_model, cache_dir, tmp_path):
    """The site test bed: other patients of the training site keep inside the ranges; site C's scanner (noise 8-12 HU
    against site A's 3-6 HU, a 210-220 mm field of view against 230-250 mm) lies outside them."""
    other_people = [*SMALL_PHANTOM, "data.phantom.seed=3", f"data.cache_dir={cache_dir}"]
    same_site, _ = evaluate(phantom_model[0], tmp_path / "A", "data=phantom", *other_people)
    other_site, _ = evaluate(phantom_model[0], tmp_path / "C", "data=phantom", "data.phantom.site=C", *other_people)
    assert same_site["data/ood_series_share"] == 0
    assert other_site["data/ood_series_share"] == 1
    flags = pd.read_csv(tmp_path / "C" / "series_ood.csv")
    assert flags["ood_figures"].str.contains("brain_noise_hu").all()
