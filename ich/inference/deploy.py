"""A trained model as one call from int16 HU slices to probabilities, whatever file it comes in.

`load_deployed(path)` takes a training run folder, a .ckpt, or a file written by `python -m ich.export`
(.onnx or TorchScript .pt, with its JSON beside it) and gives a `Deployed`: the output names, the
operating thresholds, how the inputs are shaped, and `deployed(hu)`. Checkpoints and exported files run
the same `HUModel`, so prediction reads slices one way, whichever file a hospital was given.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from torch import nn

from ich.core.runs import checkpoint_file
from ich.data.windows import parse_windows
from ich.training.module import ICHLitModule
from ich.training.sequence import is_stage_two

# Exported files by suffix; each has `<file>.json` beside it (ich.export.description writes it).
EXPORT_FORMATS = {".onnx": "onnx", ".pt": "torchscript"}
INPUT_NAME = "hu"
OUTPUT_NAME = "probabilities"
_INT16_MIN = int(np.iinfo(np.int16).min)
# Lightning's mixed precisions (with their short spellings) and the dtype autocast computes in.
MIXED_PRECISIONS = {"bf16-mixed": torch.bfloat16, "bf16": torch.bfloat16, "16-mixed": torch.float16, "16": torch.float16}


class HUModel(nn.Module):
    """int16 HU stacks [B, 2k+1, S, S] -> the task's probabilities [B, K] at the checkpoint's temperature.

    What the data path does between the read slice and the model happens here, so that one exported file
    is the whole model: each context slice gives one uint8 plane per window, stacked slice-major (all
    windows of s-k, then of s-k+1, ...), a lone plane repeated to three channels; then ICHLitModule.forward
    (to [0, 1], the checkpoint's normalisation, backbone, float32 head) and the task's sigmoid or softmax.

    Each window is a table of the uint8 level of every int16 value, filled by the training path's own
    `ich.data.windows.Window`: the planes equal the loader's bit for bit, for every input, where a float32
    copy of OpenCV's saturating arithmetic would have to round as OpenCV does on each CPU it dispatches to.
    """

    def __init__(self, model: ICHLitModule):
        super().__init__()
        inputs = model.hparams.get("inputs")
        windows = parse_windows(inputs["windows"], option="the checkpoint's windows")
        levels = np.arange(_INT16_MIN, _INT16_MIN + (1 << 16), dtype=np.int16)
        # [65536, W]: a gather by HU gives [..., W], one level per window
        self.register_buffer("window_levels", torch.from_numpy(np.stack([w(levels) for w in windows], axis=1)))
        slices = 2 * int(inputs["context"]) + 1
        self.repeat = 3 if len(windows) * slices == 1 else 1  # as SliceDataset feeds ImageNet stems
        self.model = model

    def planes(self, hu: torch.Tensor) -> torch.Tensor:
        """The uint8 planes [B, C, S, S] the data loader makes of the same slices (SliceDataset.image)."""
        levels = self.window_levels[hu.long() - _INT16_MIN]  # [B, 2k+1, S, S, W]
        return levels.permute(0, 1, 4, 2, 3).flatten(1, 2).repeat(1, self.repeat, 1, 1)

    def forward(self, hu: torch.Tensor) -> torch.Tensor:
        return self.model.probabilities(self.model(self.planes(hu)))


@dataclass(frozen=True)
class Deployed:
    """A model ready to predict: what it outputs, at which thresholds, what it takes, and the call itself.

    Attributes:
        labels: the output names, in output order.
        thresholds: float32 [K], the operating threshold per output (the checkpoint's `op_thresholds`).
        thresholds_chosen: whether they were chosen on the validation patients; False means the fixed
            `threshold` of training (0.5 by default), which is no operating point.
        temperature: the logits' divisor before the sigmoid/softmax (1 unless calibrated).
        inputs: the checkpoint's inputs: source, encoding, windows ([center, width] pairs), context, image_size,
            channels, modalities (read as CT).
        task: binary, subtype or multilabel (ich.core.tasks).
        source: the file the model was read from.
        run: int16 HU [B, 2k+1, S, S] -> probabilities, unchecked (call the Deployed itself instead).
        module: the torch HUModel when read from a checkpoint (heat maps need its layers); None for exported files.
    """

    labels: tuple[str, ...]
    thresholds: np.ndarray
    thresholds_chosen: bool
    temperature: float
    inputs: dict
    task: str
    source: Path
    run: Callable[[np.ndarray], np.ndarray] = field(repr=False)
    module: HUModel | None = field(default=None, repr=False)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """One item's shape: 2k+1 context slices of image_size x image_size pixels."""
        size = int(self.inputs["image_size"])
        return 2 * int(self.inputs["context"]) + 1, size, size

    def __call__(self, hu: np.ndarray) -> np.ndarray:
        """float32 probabilities [B, K] of int16 HU stacks [B, 2k+1, S, S], the centre slice the one predicted."""
        slices, size, _ = self.input_shape
        if hu.dtype != np.int16 or hu.ndim != 4 or hu.shape[1:] != self.input_shape:
            context = (f" and stack it between its {slices // 2} neighbours on each side (the edge slice repeated at "
                       "a series' ends)") if slices > 1 else ""
            raise ValueError(
                f"{self.source.name} takes int16 HU of shape [batch, {slices}, {size}, {size}], not {hu.dtype} "
                f"{list(hu.shape)}: read each slice with ich.data.dicom.read_hu_square(path, {size}){context}."
            )
        return np.asarray(self.run(np.ascontiguousarray(hu)), dtype=np.float32)


def load_deployed(path: str | Path) -> Deployed:
    """The model in a training run folder (its best checkpoint), a .ckpt, or an exported .onnx / .pt file."""
    path = Path(path).expanduser()
    if path.suffix in EXPORT_FORMATS and path.is_file():
        return _load_exported(path)
    checkpoint = model_checkpoint(path)
    module = HUModel(load_model(checkpoint)).eval()
    model = module.model
    thresholds = model.op_thresholds.cpu().numpy().astype(np.float32)
    temperature = float(model.temperature)

    def run(hu: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), autocast(str(model.hparams.precision)):
            return module(torch.from_numpy(hu)).numpy()

    return Deployed(labels=tuple(model.task.outputs), thresholds=thresholds,
                    thresholds_chosen=operating_point_chosen(thresholds, float(model.hparams.threshold), temperature),
                    temperature=temperature, inputs=dict(model.hparams["inputs"]), task=model.task.name,
                    source=checkpoint, module=module, run=run)


def model_checkpoint(path: Path) -> Path:
    """The .ckpt of a `ckpt_path` that is not an exported file (a run folder means the checkpoint it tested)."""
    return checkpoint_file(path, "ckpt_path", "a run folder of train.py, a .ckpt, or a file of python -m ich.export")


def load_model(checkpoint: Path) -> ICHLitModule:
    """The checkpoint's model on the CPU in float32 and the plain memory layout, refusing what takes no HU: a model of
    images whose window is unknown (its `inputs` name no windows; ich.data.encoding).

    channels_last is a training speed setting (trainer.channels_last): a deployed model must not carry it.
    """
    if is_stage_two(checkpoint):
        raise ValueError(f"{checkpoint} is a stage-2 sequence model, which reads whole series rather than slices: "
                         "deploy the stage-1 checkpoint it was trained on (predict.py takes the stage-2 run itself).")
    model = ICHLitModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True, channels_last=False)
    inputs = model.hparams.get("inputs")
    if not inputs:
        raise ValueError(f"{checkpoint} does not say how its inputs were made (it predates self-describing "
                         "checkpoints): train it again with this version of ich.")
    require_windows(inputs, f"{checkpoint} was trained on", "it")
    return model.float().to(memory_format=torch.contiguous_format).eval().requires_grad_(False)


def require_windows(inputs: dict, trained_on: str, retrain: str) -> None:
    """A model of PNG/JPG slices of an unknown window (data.encoding=none) has no window to apply to HU: refused,
    naming the option to train it with. `trained_on` begins the sentence, `retrain` names what to train again."""
    if inputs["windows"] is None:
        raise ValueError(f"{trained_on} PNG/JPG slices of an unknown window (data=images with data.encoding=none), so "
                         f"it has no window to apply to HU: train {retrain} with data.encoding=window "
                         "data.encoding_window=[CENTRE,WIDTH], the window its images were made with.")


def autocast(precision: str) -> torch.autocast:
    """The CPU autocast of a Lightning precision: a model tested in bf16-mixed (or 16-mixed) predicts in it too, so
    its probabilities are its test stage's; float32 for every other precision."""
    dtype = MIXED_PRECISIONS.get(precision)
    return torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def operating_point_chosen(thresholds: np.ndarray, threshold: float, temperature: float) -> bool:
    """Whether ICHLitModule.choose_operating_point wrote these buffers: until it runs they hold the fixed
    `threshold` and temperature 1 (set at construction and again at every fit start). Thresholds that all
    fell back to `threshold` (no class in validation) and no calibration count as not chosen, as they are."""
    return bool(np.any(thresholds != np.float32(threshold)) or temperature != 1.0)


def description_path(exported: Path) -> Path:
    """The JSON beside an exported file: model.onnx -> model.onnx.json (so model.pt beside it keeps its own)."""
    return exported.with_name(exported.name + ".json")


def _load_exported(path: Path) -> Deployed:
    described = description_path(path)
    if not described.is_file():
        raise FileNotFoundError(
            f"{described} is missing: an exported model needs the JSON python -m ich.export wrote beside it "
            "(labels, thresholds, inputs); copy it along or export again."
        )
    about = json.loads(described.read_text())
    if EXPORT_FORMATS[path.suffix] == "onnx":
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def run(hu: np.ndarray) -> np.ndarray:
            return session.run([OUTPUT_NAME], {INPUT_NAME: hu})[0]
    else:
        scripted = torch.jit.load(str(path), map_location="cpu")

        def run(hu: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return scripted(torch.from_numpy(hu)).numpy()

    return Deployed(labels=tuple(about["labels"]), thresholds=np.asarray(about["thresholds"], dtype=np.float32),
                    thresholds_chosen=bool(about["thresholds_chosen"]), temperature=float(about["temperature"]),
                    inputs=about["inputs"], task=about["task"], source=path, run=run)
