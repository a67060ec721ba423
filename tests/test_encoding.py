"""PNG/JPG slices that say what their pixels are (data.encoding): HU images become the planes their DICOMs give, a
model of window-encoded images reads DICOMs, a DICOM model reads HU images, and what cannot match is refused."""

import cv2
import numpy as np
import pandas as pd
import pydicom
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from conftest import FAST_RUN, compose_config
from ich.data.datamodule import ICHDataModule
from ich.data.phantom import generate, generate_images
from ich.data.sources import read_rsna_labels
from ich.evaluate import run as evaluate_run
from ich.inference.deploy import load_deployed
from ich.predict import run as predict_run
from ich.train import run as train
from ich.training.module import ICHLitModule

# Its module fixtures write the phantom and train once; under pytest-xdist the module stays on one worker.

PATIENTS, SLICES, SIZE = 10, 6, 64  # the phantom of the module, as DICOMs and as images


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """Phantom DICOMs in the RSNA layout, without quirk files, and each series' image ids in slice order."""
    root = tmp_path_factory.mktemp("dicoms")
    written = generate(root, patients=PATIENTS, slices=SLICES, size=SIZE, seed=0, quirks=False)
    return root, written["series"]


def stored_hu(path) -> np.ndarray:
    """A DICOM's HU as the standard says (stored value x RescaleSlope + RescaleIntercept), read with pydicom alone."""
    ds = pydicom.dcmread(path)
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def write_hu_images(phantom, folder, encode) -> None:
    """The phantom's slices as images of `encode(hu)`, with labels.csv giving each its patient, series and slice."""
    root, series = phantom
    labels = read_rsna_labels(root / "stage_2_train.csv").set_index("image_id")
    (folder / "images").mkdir(parents=True)
    rows = []
    for patient, image_ids in series.items():
        for number, image_id in enumerate(image_ids):
            cv2.imwrite(str(folder / "images" / f"{image_id}.png"), encode(stored_hu(root / "stage_2_train" / f"{image_id}.dcm")))
            rows.append({"filename": f"images/{image_id}.png", "patient": patient, "series": patient, "slice": number,
                         **labels.loc[image_id].to_dict()})
    pd.DataFrame(rows).to_csv(folder / "labels.csv", index=False)


def eight_bit_hu(hu: np.ndarray) -> np.ndarray:
    """Pixel = HU for 0..255, clipped: the encoding of the issue's third slice set."""
    return np.clip(hu, 0, 255).astype(np.uint8)


def hu_plus_1024(hu: np.ndarray) -> np.ndarray:
    """16-bit PNG pixels that store HU + 1024 (the range DICOM readers give: -1024 to 3071)."""
    return (np.clip(hu, -1024, 3071) + 1024).astype(np.uint16)


def planes(cache_dir, tmp_path, *overrides) -> dict[str, np.ndarray]:
    """Image id -> the CxHxW uint8 input of every slice, through the real config's data module."""
    cfg = compose_config("train", [*overrides, f"data.cache_dir={cache_dir}", "data.num_workers=0",
                                   f"output_dir={tmp_path}"])
    datamodule = ICHDataModule.from_config(cfg)
    datamodule.prepare_data()
    datamodule.setup()
    every = datamodule.every_slice()
    return {item["image_id"]: item["image"].numpy() for item in (every[i] for i in range(len(every)))}


def dicom_data(phantom) -> list[str]:
    return ["data=rsna", f"data.root={phantom[0]}"]


def image_data(folder, *encoding) -> list[str]:
    return ["data=images", f"data.root={folder}", f"data.labels={folder / 'labels.csv'}", *encoding]


def assert_same_planes(dicom: dict, images: dict) -> None:
    assert sorted(images) == sorted(dicom) and len(dicom) == PATIENTS * SLICES
    for image_id, plane in dicom.items():
        np.testing.assert_array_equal(images[image_id], plane, err_msg=image_id)


# --- HU images are windowed as DICOMs are -----------------------------------------------------------------


def test_an_8_bit_hu_png_gives_the_planes_of_its_dicom(phantom, cache_dir, tmp_path):
    """Pixel = HU clipped to 0..255: the brain window (0 to 80 HU) lies inside it, so nothing it shows was clipped."""
    write_hu_images(phantom, tmp_path / "pngs", eight_bit_hu)
    shape = ["data.windows=[brain]", f"data.image_size={SIZE}"]
    from_dicoms = planes(cache_dir, tmp_path / "a", *dicom_data(phantom), *shape)
    from_pngs = planes(cache_dir, tmp_path / "b", *image_data(tmp_path / "pngs", "data.encoding=hu"), *shape)
    assert_same_planes(from_dicoms, from_pngs)


def test_a_16_bit_png_of_hu_plus_1024_gives_the_planes_of_its_dicom_with_windows_context_and_resizing(
        phantom, cache_dir, tmp_path):
    write_hu_images(phantom, tmp_path / "pngs", hu_plus_1024)
    shape = ["data.windows=[brain,subdural,bone]", "data.context=1", "data.image_size=40"]
    from_dicoms = planes(cache_dir, tmp_path / "a", *dicom_data(phantom), *shape)
    from_pngs = planes(cache_dir, tmp_path / "b", *image_data(tmp_path / "pngs", "data.encoding=hu",
                                                             "data.hu_offset=-1024"), *shape)
    assert_same_planes(from_dicoms, from_pngs)
    assert next(iter(from_pngs.values())).shape == (9, 40, 40)  # 3 windows x 3 slices


def test_a_window_reaching_past_the_hu_the_images_hold_is_refused_naming_data_windows(phantom, cache_dir, tmp_path):
    write_hu_images(phantom, tmp_path / "pngs", eight_bit_hu)
    with pytest.raises(ValueError, match=r"^The window \[80, 200\] needs HU -20 to 180, but these uint8 images hold "
                                         r"only 0 to 255 .*data.windows") as err:
        planes(cache_dir, tmp_path, *image_data(tmp_path / "pngs", "data.encoding=hu"), "data.windows=[brain,subdural]")
    assert str(err.value).count(". ") == 0
    write_hu_images(phantom, tmp_path / "wide", hu_plus_1024)  # 16-bit, but stated to hold 0 to 255 HU only
    with pytest.raises(ValueError, match=r"hold only 0 to 255 \(data.hu_clip"):
        planes(cache_dir, tmp_path, *image_data(tmp_path / "wide", "data.encoding=hu", "data.hu_offset=-1024",
                                                "data.hu_clip=[0,255]"), "data.windows=[brain,subdural]")


def test_context_on_hu_images_without_their_order_names_the_columns(phantom, cache_dir, tmp_path):
    write_hu_images(phantom, tmp_path / "pngs", hu_plus_1024)
    table = pd.read_csv(tmp_path / "pngs" / "labels.csv").drop(columns=["series", "slice"])
    table.to_csv(tmp_path / "pngs" / "unordered.csv", index=False)
    with pytest.raises(ValueError, match=r"add a `slice` column .* a `series` column to data.labels"):
        planes(cache_dir, tmp_path, "data=images", f"data.root={tmp_path / 'pngs'}", "data.encoding=hu",
               f"data.labels={tmp_path / 'pngs' / 'unordered.csv'}", "data.hu_offset=-1024", "data.context=1")


@pytest.mark.parametrize(("overrides", "message"), [
    (["data.encoding=window"], r"give both \(e.g. data.encoding=window data.encoding_window=\[40,80\]\)"),
    (["data.encoding_window=brain"], r"give both"),
    (["data.encoding=gamma"], r"Unknown data.encoding=gamma: use none"),
    (["data.hu_clip=[0,255]"], r"data.hu_clip is the HU range of data.encoding=hu images"),
    (["data.encoding=window", "data.encoding_window=[40,80,3]"], r"Bad window 40 in data.encoding_window"),
])
def test_an_encoding_missing_a_key_or_contradicting_one_is_refused_naming_it(overrides, message, tmp_path):
    cfg = compose_config("train", [*image_data(tmp_path), *overrides, f"output_dir={tmp_path}"])
    with pytest.raises(ValueError, match=message):
        ICHDataModule.from_config(cfg)


# --- checkpoints used across encodings --------------------------------------------------------------------


def saved_model(path, windows, data: list[str], **inputs) -> None:
    """An untrained checkpoint whose inputs were made with `windows` (None: unknown) from the composed `data`."""
    described = {"source": "images", "windows": windows, "context": 0, "image_size": SIZE, "channels": 3,
                 "modalities": ["CT"], "min_brain_fraction": 0.0, **inputs}
    trained = OmegaConf.to_container(compose_config("train", data).data, resolve=True)
    model = ICHLitModule(task="binary", backbone="test_resnet", inputs=described, data=trained)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "pytorch-lightning_version": pl.__version__}, path)


def evaluate(checkpoint, output_dir, *overrides):
    overrides = [f"ckpt_path={checkpoint}", *overrides]
    return evaluate_run(compose_config("evaluate", [*overrides, f"output_dir={output_dir}"]), overrides)


def test_a_model_of_images_of_unknown_window_is_refused_on_hu_data_naming_the_encoding(phantom, tmp_path):
    """Written as a checkpoint of before data.encoding (no `encoding` input): read as encoding none."""
    saved_model(tmp_path / "none.ckpt", None, image_data(tmp_path))
    fix = r"train it again with data.encoding=window data.encoding_window=\[CENTRE,WIDTH\]"
    with pytest.raises(ValueError, match=r"^The checkpoint was trained on PNG/JPG slices of an unknown window.*" + fix) as err:
        evaluate(tmp_path / "none.ckpt", tmp_path / "out", *dicom_data(phantom))
    assert str(err.value).count(". ") == 0
    with pytest.raises(ValueError, match=fix):
        evaluate(tmp_path / "none.ckpt", tmp_path / "out", *image_data(tmp_path, "data.encoding=hu"))
    with pytest.raises(ValueError, match=r"has no window to apply to HU: train it with data.encoding=window"):
        load_deployed(tmp_path / "none.ckpt")


def test_images_of_unknown_window_under_a_windowed_model_are_refused_naming_the_window(tmp_path):
    saved_model(tmp_path / "dicom.ckpt", [[40.0, 80.0], [80.0, 200.0]], ["data=phantom"], source="dicom", encoding="hu")
    with pytest.raises(ValueError, match=r"set data.encoding=window data.encoding_window=\[\[40,80\],\[80,200\]\] if "
                                         r"they were made with it, or data.encoding=hu") as err:
        evaluate(tmp_path / "dicom.ckpt", tmp_path / "out", *image_data(tmp_path))
    assert str(err.value).count(". ") == 0


def test_images_of_another_window_than_the_models_are_refused_naming_hu_data(tmp_path):
    saved_model(tmp_path / "brain.ckpt", [[40.0, 80.0]], image_data(tmp_path, "data.encoding=window",
                                                                      "data.encoding_window=brain"), encoding="window")
    with pytest.raises(ValueError, match=r"windowed with \[\[80.0, 200.0\]\] \(data.encoding_window\) and cannot be "
                                         r"windowed again.*data.encoding=hu") as err:
        evaluate(tmp_path / "brain.ckpt", tmp_path / "out",
                 *image_data(tmp_path, "data.encoding=window", "data.encoding_window=subdural"))
    assert str(err.value).count(". ") == 0


@pytest.fixture(scope="module")
def window_model(cache_dir, tmp_path_factory):
    """A tiny model trained a few batches on the phantom's brain-window PNGs, declared as such."""
    folder = tmp_path_factory.mktemp("brain-pngs")
    generate_images(folder, patients=PATIENTS, slices=SLICES, size=SIZE, seed=0)
    run = tmp_path_factory.mktemp("window-run")
    fast = [o for o in FAST_RUN if not o.startswith("data.phantom.")]
    cfg = compose_config("train", [*fast, *image_data(folder, "data.encoding=window", "data.encoding_window=brain"),
                                   f"output_dir={run}", f"data.cache_dir={cache_dir}", "test=false",
                                   "trainer.precision=32-true", "+trainer.limit_train_batches=3",
                                   "+trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0"])
    train(cfg)
    return run / "checkpoints" / "last.ckpt", folder


@pytest.mark.slow
def test_a_window_encoded_model_reads_dicoms_as_its_images_and_predicts_a_dicom_folder(window_model, phantom, tmp_path):
    checkpoint, folder = window_model
    assert torch.load(checkpoint, weights_only=True)["hyper_parameters"]["inputs"]["windows"] == [[40.0, 80.0]]
    evaluate(checkpoint, tmp_path / "pngs")  # its own images: the training run's test patients
    evaluate(checkpoint, tmp_path / "dicoms", *dicom_data(phantom))  # the same slices' DICOMs, windowed by the model
    on_pngs = pd.read_csv(tmp_path / "pngs" / "predictions.csv").set_index("image_id")["prob_any"]
    on_dicoms = pd.read_csv(tmp_path / "dicoms" / "predictions.csv").set_index("image_id")["prob_any"]
    assert len(on_dicoms) == PATIENTS * SLICES and len(on_pngs) > 0
    np.testing.assert_allclose(on_dicoms.loc[on_pngs.index], on_pngs, atol=1e-5)

    cfg = compose_config("predict", [f"ckpt_path={checkpoint}", f"input={phantom[0] / 'stage_2_train'}",
                                     "min_slices=4", "heatmaps=0", f"output_dir={tmp_path / 'predict'}"])
    studies = predict_run(cfg)
    assert len(studies) == PATIENTS and not studies["failed"].any() and (studies["slices"] == SLICES).all()
    slices = pd.read_csv(tmp_path / "predict" / "slices.csv")
    np.testing.assert_allclose(np.sort(slices["prob_any"]), np.sort(on_dicoms), atol=1e-5)


@pytest.mark.slow
def test_a_dicom_model_gives_hu_pngs_of_the_same_slices_the_same_probabilities(phantom, cache_dir, tmp_path):
    run = tmp_path / "run"
    cfg = compose_config("train", [*FAST_RUN, f"output_dir={run}", f"data.cache_dir={cache_dir}", "test=false",
                                   "trainer.precision=32-true", "+trainer.limit_train_batches=3",
                                   "+trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0"])
    train(cfg)  # three windows, as the default
    checkpoint = run / "checkpoints" / "last.ckpt"
    write_hu_images(phantom, tmp_path / "pngs", hu_plus_1024)
    evaluate(checkpoint, tmp_path / "dicoms", *dicom_data(phantom))
    evaluate(checkpoint, tmp_path / "hu", *image_data(tmp_path / "pngs", "data.encoding=hu", "data.hu_offset=-1024"))
    on_dicoms = pd.read_csv(tmp_path / "dicoms" / "predictions.csv").set_index("image_id")
    on_pngs = pd.read_csv(tmp_path / "hu" / "predictions.csv").set_index("image_id").loc[on_dicoms.index]
    assert len(on_dicoms) == PATIENTS * SLICES
    np.testing.assert_allclose(on_pngs["prob_any"], on_dicoms["prob_any"], atol=1e-5)


def test_cached_embeddings_and_features_of_one_encoding_are_not_taken_for_another(tmp_path):
    """Stage-1 embeddings and classical features are cached by what the data looks like: the encoding is part of it."""
    from ich.core.runs import IDENTITY, INPUT_KEYS, describe_data

    def described(*overrides):
        data = compose_config("train", [*overrides, f"output_dir={tmp_path}"]).data
        return describe_data(OmegaConf.to_container(data, resolve=True), (*IDENTITY, *INPUT_KEYS))

    assert described(*image_data(tmp_path)) != described(*image_data(tmp_path, "data.encoding=hu"))
    assert "encoding" not in described("data=phantom")  # other sources keep the keys their caches were made under
