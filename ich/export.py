"""`python -m ich.export ckpt_path=<run or .ckpt> format=onnx|torchscript [out=PATH]`: a trained model as one
file that runs without this repository.

The file takes int16 HU slices with their context, [batch, 2k+1, S, S] (any batch), and returns the task's
probabilities [batch, K] in float32: ich.inference.deploy.HUModel, with the windows, the normalisation, the backbone
and the temperature inside, exported in float32 whatever precision and memory layout training used.
`<file>.json` beside it says what the outputs are and how to decide on them (see `description`);
`ich.inference.deploy.load_deployed` and predict.py read both.
"""

import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.core.module import _jit_is_scripting

from ich import CONFIG_DIR, __version__
from ich.cli import friendly_errors, paths_as_written
from ich.core.results import file_digest, write_atomic, write_json
from ich.evaluation.operating import DECISION_RULE
from ich.inference.deploy import EXPORT_FORMATS, INPUT_NAME, OUTPUT_NAME, Deployed, description_path, load_deployed

log = logging.getLogger(__name__)

SUFFIXES = {name: suffix for suffix, name in EXPORT_FORMATS.items()}
# torch.export specialises a dimension of size 1, so the example batch that traces the model has two slices
EXAMPLE_BATCH = 2


@paths_as_written
@hydra.main(config_path=str(CONFIG_DIR), config_name="export", version_base="1.3")
@friendly_errors
def main(cfg: DictConfig) -> None:
    run(cfg)


def run(cfg: DictConfig) -> Path:
    """Export `cfg.ckpt_path` as `cfg.format` to `cfg.out` (or model.<suffix> in cfg.output_dir); returns the file."""
    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.ckpt_path:
        raise ValueError("Export needs a checkpoint: pass ckpt_path=PATH to a run folder of train.py or a .ckpt.")
    if cfg.format not in SUFFIXES:
        raise ValueError(f"Unknown format={cfg.format}: choose format=onnx or format=torchscript.")
    out = Path(cfg.out).expanduser() if cfg.out else Path(cfg.output_dir) / f"model{SUFFIXES[cfg.format]}"
    path = export(Path(cfg.ckpt_path).expanduser(), cfg.format, out)
    print(f"Wrote {path} and {description_path(path).name} beside it")
    return path


def export(ckpt_path: Path, format: str, out: Path) -> Path:
    """Write the checkpoint (or a run folder's best one) as one `format` file at `out`, its JSON beside it."""
    if out.suffix != SUFFIXES[format]:
        raise ValueError(f"out={out} must end in {SUFFIXES[format]} for format={format}: "
                         "predict.py and ich.inference.deploy recognise an exported file by its suffix.")
    deployed = load_deployed(ckpt_path)
    if deployed.module is None:
        raise ValueError(f"ckpt_path={ckpt_path} is an exported file already: pass the .ckpt or run folder it came from.")
    module = deployed.module
    generator = torch.Generator().manual_seed(0)
    # any values do: the traced graph does not depend on them; these are HU of air to bone
    example = torch.randint(-1024, 3072, (EXAMPLE_BATCH, *deployed.input_shape), generator=generator).to(torch.int16)
    out.parent.mkdir(parents=True, exist_ok=True)
    log.info("Exporting %s as %s to %s", deployed.source, format, out)
    with torch.no_grad():
        if format == "onnx":
            write_atomic(out, lambda tmp: _save_onnx(module, example, tmp))
        else:
            write_atomic(out, lambda tmp: _save_torchscript(module, example, tmp))
    write_json(description_path(out), description(deployed, format, out))
    return out


def _save_onnx(module: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    program = torch.onnx.export(module, (example,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, verbose=False)
    program.save(str(path), external_data=False)  # one file: the weights inside


def _save_torchscript(module: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    # The tracer reads every attribute of every submodule, and LightningModule.trainer raises outside a
    # Trainer unless Lightning's scripting flag is up: Lightning's own graph logging traces inside it too.
    with _jit_is_scripting():
        torch.jit.trace(module, example, check_trace=False).save(str(path))


def description(deployed: Deployed, format: str, out: Path) -> dict:
    """The JSON beside an exported file: enough to use it without this repository, and to trace it back."""
    slices, size, _ = deployed.input_shape
    model = deployed.module.model
    return {
        "format": format,
        "file": out.name,
        "task": deployed.task,
        "labels": list(deployed.labels),
        "thresholds": [float(t) for t in deployed.thresholds],
        "thresholds_chosen": deployed.thresholds_chosen,
        "decision": DECISION_RULE,
        "fixed_threshold": float(model.hparams.threshold),
        "temperature": deployed.temperature,
        "input": {"name": INPUT_NAME, "dtype": "int16", "shape": ["batch", slices, size, size],
                  "holds": "Hounsfield units of the slice predicted"
                           + (f" between its {slices // 2} neighbours on each side in its series (the edge slice "
                              "repeated at the ends)" if slices > 1 else "")
                           + f", {'each ' if slices > 1 else ''}as ich.data.dicom.read_hu_square(path, {size}) reads it"},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", len(deployed.labels)],
                   "holds": f"the probability of each label, {'softmax' if model.task.loss == 'ce' else 'sigmoid'} "
                            "at the temperature"},
        "inputs": deployed.inputs,
        "backbone": model.hparams.backbone,
        "checkpoint": str(deployed.source),
        "checkpoint_sha256": file_digest(str(deployed.source)),
        "ich_version": __version__,
    }


if __name__ == "__main__":
    main()
