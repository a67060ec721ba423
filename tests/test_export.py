"""Deployable models: int16 HU slices in, probabilities out, the same from a checkpoint, an ONNX file and a
TorchScript file, compared with the checkpoint run on the training data path's images of the same slices."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pydicom
import pytest
import torch

from conftest import FAST_RUN, compose_config
from ich import CONFIG_DIR
from ich.core.tasks import LABELS, get_task
from ich.data.dataset import DicomLoader, SliceDataset, as_bytes
from ich.data.dicom import read_hu_square
from ich.data.phantom import generate
from ich.data.windows import parse_windows, window_planes
from ich.export import export, run as run_export
from ich.inference.deploy import load_deployed
from ich.train import run as train
from ich.training.module import ICHLitModule
from test_model import TINY
from test_module import fit

# Its module fixtures train or write the data once; under pytest-xdist (`--dist loadgroup`) the module
# stays on one worker so that they are not built again on another.

ROOT = CONFIG_DIR.parent
SIZE = 32
THREE_WINDOWS = ["brain", "subdural", "bone"]


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """Slice paths in series order: two phantom series and pydicom's real CT_small.dcm as a series of one."""
    root = tmp_path_factory.mktemp("phantom-series")
    written = generate(root, patients=2, slices=5, size=96, seed=3, quirks=False)
    ordered = [[root / "stage_2_train" / f"{image_id}.dcm" for image_id in ids] for ids in written["series"].values()]
    return [*ordered, [Path(pydicom.data.get_testdata_file("CT_small.dcm"))]]


def data_path(series, windows, context, size):
    """The HU stacks [N, 2k+1, S, S] a deployed model takes, and the uint8 images [N, C, S, S] that training's
    data path (DicomLoader, SliceDataset) makes of the same slices, the edge slice repeated at a series' ends."""
    paths = [path for slices in series for path in slices]
    stacks, first = [], 0
    for slices in series:
        last = len(slices) - 1
        stacks += [[first + min(max(k + offset, 0), last) for offset in range(-context, context + 1)]
                   for k in range(len(slices))]
        first += len(slices)
    stacks = np.array(stacks)
    loader = DicomLoader(as_bytes(paths), tuple(parse_windows(windows)), size)
    dataset = SliceDataset(stacks, np.zeros((len(paths), 1), np.float32), as_bytes([p.stem for p in paths]), loader)
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    hu = np.stack([read_hu_square(path, size) for path in paths])[stacks]
    return hu, images


def checkpoint_probabilities(checkpoint, images):
    """What the checkpoint says of the data path's images: its forward, then the task's activation."""
    model = ICHLitModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True).eval()
    with torch.no_grad():
        return model.probabilities(model(images)).numpy()


def saved_checkpoint(path, task="binary", windows=("brain",), context=0, backbone=TINY, source="dicom"):
    """A Lightning checkpoint of a model fitted for two steps, with the inputs a data module would describe."""
    pairs = None if source == "images" else [[w.center, w.width] for w in parse_windows(list(windows))]
    planes = 1 if pairs is None else len(pairs) * (2 * context + 1)
    channels = 3 if planes == 1 else planes
    inputs = {"source": source, "windows": pairs, "context": context, "image_size": SIZE, "channels": channels}
    model = ICHLitModule(task=task, backbone=backbone, in_chans=channels, inputs=inputs, data={"source": source})
    fit(model).save_checkpoint(path)
    return path


# The tiny checkpoints the quick tests share: name -> task, windows, context.
SETTINGS = {
    "one_window": ("binary", ["brain"], 0),  # one plane: three identical channels
    "fractional": ("subtype", [[35, 75], "bone"], 0),  # a window with a fractional lower edge: OpenCV's other branch
    "context": ("multilabel", THREE_WINDOWS, 1),  # 3 windows x 3 slices, slice-major
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> the fitted checkpoint of SETTINGS[name], written once a module."""
    written = {}

    def get(name):
        if name not in written:
            written[name] = saved_checkpoint(tmp_path_factory.mktemp(name) / "model.ckpt", *SETTINGS[name])
        return written[name]

    return get


@pytest.mark.parametrize("name", SETTINGS)
def test_hu_model_makes_the_loaders_images_and_the_checkpoints_probabilities(checkpoints, series, name):
    task, windows, context = SETTINGS[name]
    checkpoint = checkpoints(name)
    hu, images = data_path(series, windows, context, SIZE)

    deployed = load_deployed(checkpoint)

    assert torch.equal(deployed.module.planes(torch.from_numpy(hu)), images)
    probabilities = deployed(hu)
    assert probabilities.dtype == np.float32 and probabilities.shape == (len(hu), get_task(task).num_outputs)
    np.testing.assert_allclose(probabilities, checkpoint_probabilities(checkpoint, images), rtol=0, atol=1e-6)
    assert deployed.labels == get_task(task).outputs
    assert deployed.thresholds.tolist() == [0.5] * len(deployed.labels) and not deployed.thresholds_chosen


def test_every_int16_value_is_windowed_as_the_loader_windows_it(checkpoints):
    hu = np.arange(-32768, 32768, dtype=np.int16).reshape(4, 1, 128, 128)  # every value a slice can hold
    windows = parse_windows(SETTINGS["fractional"][1])

    planes = load_deployed(checkpoints("fractional")).module.planes(torch.from_numpy(hu)).numpy()

    for item in range(len(hu)):
        np.testing.assert_array_equal(planes[item], np.stack(window_planes(hu[item, 0], windows)))


def test_hu_of_another_type_or_shape_is_refused_naming_the_reader(checkpoints, series):
    deployed = load_deployed(checkpoints("context"))
    hu, _ = data_path(series, THREE_WINDOWS, 1, SIZE)
    with pytest.raises(ValueError, match=r"takes int16 HU of shape \[batch, 3, 32, 32\], not float32.*read_hu_square"):
        deployed(hu.astype(np.float32))
    with pytest.raises(ValueError, match=r"not int16 \[11, 1, 32, 32\]"):
        deployed(hu[:, :1])


def test_a_checkpoint_of_images_of_unknown_window_is_refused_in_one_sentence(tmp_path):
    checkpoint = saved_checkpoint(tmp_path / "images.ckpt", source="images")
    with pytest.raises(ValueError, match=r"PNG/JPG slices of an unknown window \(data=images with data.encoding=none\)"
                                         r".*train it with data.encoding=window data.encoding_window=") as err:
        load_deployed(checkpoint)
    assert str(err.value).count(". ") == 0
    with pytest.raises(ValueError, match="data.encoding=none"):
        export(checkpoint, "onnx", tmp_path / "model.onnx")


def test_a_stage_two_checkpoint_is_refused_naming_its_stage_one(checkpoints, tmp_path):
    saved = torch.load(checkpoints("one_window"), map_location="cpu", weights_only=True)
    saved["hyper_parameters"]["encoder"] = {"checkpoint": "stage-1.ckpt"}  # what marks a SequenceLitModule's file
    torch.save(saved, tmp_path / "sequence.ckpt")
    with pytest.raises(ValueError, match="is a stage-2 sequence model.*deploy the stage-1 checkpoint"):
        export(tmp_path / "sequence.ckpt", "onnx", tmp_path / "model.onnx")


def test_an_exported_file_carries_its_json_and_needs_it(checkpoints, series, tmp_path):
    checkpoint = checkpoints("context")
    hu, images = data_path(series, THREE_WINDOWS, 1, SIZE)

    out = export(checkpoint, "torchscript", tmp_path / "deploy" / "model.pt")

    described = tmp_path / "deploy" / "model.pt.json"
    about = json.loads(described.read_text())
    assert about["labels"] == list(LABELS) and about["task"] == "multilabel"
    assert about["thresholds"] == [0.5] * 6 and about["thresholds_chosen"] is False
    assert about["decision"] == "called when probability >= threshold"
    assert about["input"]["shape"] == ["batch", 3, SIZE, SIZE] and about["input"]["dtype"] == "int16"
    assert about["inputs"]["windows"] == [[40.0, 80.0], [80.0, 200.0], [600.0, 2800.0]]
    assert about["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    np.testing.assert_allclose(load_deployed(out)(hu), checkpoint_probabilities(checkpoint, images), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match=r"out=.*model\.onnx must end in \.pt for format=torchscript"):
        export(checkpoint, "torchscript", tmp_path / "model.onnx")

    described.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{described} is missing: .*copy it along or export again"):
        load_deployed(out)


def test_the_export_config_writes_model_pt_into_its_folder_and_names_a_wrong_format(checkpoints, tmp_path):
    checkpoint = checkpoints("one_window")
    cfg = compose_config("export", [f"ckpt_path={checkpoint}", "format=torchscript", f"output_dir={tmp_path}"])

    assert run_export(cfg) == tmp_path / "model.pt"

    assert json.loads((tmp_path / "model.pt.json").read_text())["format"] == "torchscript"
    with pytest.raises(ValueError, match="Unknown format=tflite: choose format=onnx or format=torchscript"):
        run_export(compose_config("export", [f"ckpt_path={checkpoint}", "format=tflite", f"output_dir={tmp_path}"]))


@pytest.fixture(scope="module")
def trained(cache_dir, tmp_path_factory):
    """A training run folder: multilabel, calibrated, 3 windows x 3 slices, at the CPU's own training settings
    (bf16 autocast and channels-last where the CPU computes bf16 natively), which the export must not keep."""
    path = tmp_path_factory.mktemp("train-export")
    train(compose_config("train", [*FAST_RUN, f"output_dir={path}", f"data.cache_dir={cache_dir}", "task=multilabel",
                                   "task.calibrate=true", "data.context=1", "test=false"]))
    return path


@pytest.mark.slow
def test_onnx_and_torchscript_files_give_the_checkpoints_probabilities(trained, series, tmp_path):
    checkpoint = next((trained / "checkpoints").glob("epoch*.ckpt"))
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    onnx_file = tmp_path / "model.onnx"
    command = [sys.executable, "-m", "ich.export", f"ckpt_path={trained}", f"out={onnx_file}",
               f"hydra.run.dir={tmp_path / 'export'}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    script_file = export(trained, "torchscript", tmp_path / "model.pt")
    hu, images = data_path(series, THREE_WINDOWS, 1, 64)
    expected = checkpoint_probabilities(checkpoint, images)

    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (given,), (returned,) = session.get_inputs(), session.get_outputs()
    assert given.type == "tensor(int16)" and returned.type == "tensor(float)"
    assert isinstance(given.shape[0], str) and given.shape[1:] == [3, 64, 64]  # any batch
    np.testing.assert_allclose(session.run(None, {given.name: hu})[0], expected, rtol=0, atol=1e-4)
    np.testing.assert_allclose(session.run(None, {given.name: hu[:1]})[0], expected[:1], rtol=0, atol=1e-4)
    scripted = torch.jit.load(str(script_file))
    np.testing.assert_allclose(scripted(torch.from_numpy(hu[:5])).numpy(), expected[:5], rtol=0, atol=1e-4)
    np.testing.assert_allclose(load_deployed(onnx_file)(hu), expected, rtol=0, atol=1e-4)
    types = {tensor.data_type for tensor in onnx.load(str(onnx_file)).graph.initializer}
    assert onnx.TensorProto.BFLOAT16 not in types and onnx.TensorProto.FLOAT16 not in types

    about = json.loads((tmp_path / "model.onnx.json").read_text())
    assert about["labels"] == list(LABELS) and about["task"] == "multilabel"
    assert about["thresholds"] == saved["op_thresholds"].tolist() and about["thresholds_chosen"] is True
    assert about["temperature"] == float(saved["temperature"]) != 1.0  # calibrated on validation
    assert about["inputs"]["windows"] == [[40.0, 80.0], [80.0, 200.0], [600.0, 2800.0]]
    assert about["inputs"]["context"] == 1 and about["inputs"]["image_size"] == 64
    assert about["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()


@pytest.mark.slow
def test_a_resnet18_exports_to_both_formats(tmp_path, series):
    checkpoint = saved_checkpoint(tmp_path / "resnet18.ckpt", "subtype", THREE_WINDOWS, backbone="resnet18")  # softmax
    hu, images = data_path(series, THREE_WINDOWS, 0, SIZE)
    expected = checkpoint_probabilities(checkpoint, images)
    for format, name in (("onnx", "model.onnx"), ("torchscript", "model.pt")):
        deployed = load_deployed(export(checkpoint, format, tmp_path / name))
        np.testing.assert_allclose(deployed(hu), expected, rtol=0, atol=1e-4, err_msg=format)
