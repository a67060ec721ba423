"""End to end: the real conf/ composed with overrides, real Lightning training on phantom DICOMs."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import FAST_RUN, compose_config
from ich import CONFIG_DIR
from ich.module import ICHLitModule
from ich.train import run

ROOT = CONFIG_DIR.parent
COMMON_METRICS = ("acc", "sensitivity", "specificity", "precision", "f1", "auroc")


def train(tmp_path, *overrides):
    cfg = compose_config("train", [*FAST_RUN, f"output_dir={tmp_path}", *overrides])
    return cfg, run(cfg)


def test_default_config_is_phantom_binary_on_a_small_backbone():
    cfg = compose_config("train", ["output_dir=unused"])
    assert cfg.data.source == "phantom" and cfg.task.name == "binary"
    assert cfg.model.backbone == "resnet18" and cfg.model.pretrained is False
    assert cfg.trainer.accelerator == "auto"


def test_design_example_composes_and_builds(cache_dir, tmp_path):
    """`python train.py model=densenet121 task=multilabel`, checked for one batch of each stage."""
    cfg, metrics = train(tmp_path, "model=densenet121", "task=multilabel", "debug=fdr")
    assert cfg.model.backbone == "densenet121"
    # one batch may lack a class, which leaves AUROC undefined; the thresholded metrics always exist
    assert {"test/acc", "test/sensitivity", "test/specificity", "test/logloss"} <= set(metrics)


@pytest.mark.parametrize(
    "task, per_class",
    [("binary", None), ("multilabel", "test/auroc_epidural"), ("subtype", "test/sensitivity_subdural")],
)
def test_each_task_trains_and_reports_its_metrics(cache_dir, tmp_path, task, per_class):
    _, metrics = train(tmp_path, f"task={task}", "trainer.max_epochs=2")
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert set(written) == set(metrics)
    assert {f"test/{m}" for m in COMMON_METRICS} <= set(written)
    assert "val/auroc_best" in written
    if per_class:
        assert any(name.startswith(per_class.rsplit("_", 1)[0] + "_") for name in written)
    if task == "multilabel":
        assert "test/logloss" in written
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_checkpoint_reloads_alone_and_predicts_the_same(cache_dir, tmp_path):
    cfg, _ = train(tmp_path, "task=multilabel")
    checkpoint = next((tmp_path / "checkpoints").glob("epoch*.ckpt"))
    from ich.data.datamodule import ICHDataModule

    dm = ICHDataModule.from_config(cfg)
    dm.setup()
    batch = next(iter(dm.test_dataloader()))
    first = ICHLitModule.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    second = ICHLitModule.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    with torch.no_grad():
        assert torch.equal(first(batch["image"]), second(batch["image"]))
    assert first.hparams.task == "multilabel" and first.hparams.in_chans == 3


def run_cli(*args, cwd=ROOT):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.backbone=resnet_nonexistent"], "set model.backbone to a timm model name"),
        (["data=rsna", "data.root=/no/such/folder"], "data.root=/no/such/folder does not exist"),
        (["task=segmentation"], "Could not find 'task/segmentation'"),
        (["model.depth=50"], "Could not override 'model.depth'"),
    ],
)
def test_wrong_option_gives_one_sentence_not_a_traceback(tmp_path, overrides, message):
    fast = [o for o in FAST_RUN if not o.startswith("data.phantom")]  # keys of data=phantom only
    result = run_cli("train.py", *fast, f"hydra.run.dir={tmp_path}", *overrides)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_prepare_prints_the_index_summary(cache_dir, tmp_path):
    result = run_cli("-m", "ich.prepare", *[o for o in FAST_RUN if o.startswith("data.phantom")],
                     f"data.cache_dir={cache_dir}")
    assert result.returncode == 0, result.stderr
    assert "files found: 60" in result.stdout and "read: 59" in result.stdout
    assert "images with any:" in result.stdout

