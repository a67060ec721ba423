"""End to end: the real conf/ composed with overrides, real Lightning training on phantom DICOMs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from torch.utils.data import DataLoader

from conftest import FAST_RUN, compose_config
from ich import CONFIG_DIR
from ich.train import build_trainer, run
from ich.training.module import ICHLitModule

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
    assert {"test/acc", "test/sensitivity", "test/specificity", "test/logloss_weighted"} <= set(metrics)


@pytest.mark.parametrize(
    "task, per_class",
    [("binary", None), ("multilabel", "test/auroc_epidural"), ("subtype", "test/sensitivity_subdural")],
)
def test_each_task_trains_and_reports_its_metrics(cache_dir, tmp_path, task, per_class):
    _, metrics = train(tmp_path, f"task={task}", "trainer.max_epochs=2")
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert set(written) == set(metrics)
    assert {f"test/{m}" for m in COMMON_METRICS} <= set(written)
    assert "at the operating point" in (tmp_path / "report.html").read_text()  # the test stage's report
    assert "val/auroc_best" in written and cfg_of(task).optimized_metric in written
    if per_class:
        assert any(name.startswith(per_class.rsplit("_", 1)[0] + "_") for name in written)
    if task == "multilabel":
        assert "test/logloss_weighted" in written
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def cfg_of(task):
    return compose_config("train", [f"task={task}", "output_dir=unused"])


def test_models_are_selected_on_a_validation_loss_by_default():
    """The checkpoint, early stopping and the sweep objective: val/loss, and for six labels the RSNA metric."""
    for task, monitor in (("binary", "val/loss"), ("subtype", "val/loss"), ("multilabel", "val/logloss_weighted")):
        cfg = cfg_of(task)
        callbacks = cfg.callbacks
        assert callbacks.model_checkpoint.monitor == callbacks.early_stopping.monitor == monitor
        assert callbacks.model_checkpoint.mode == callbacks.early_stopping.mode == "min"
        assert cfg.optimized_metric == f"{monitor}_best"
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        sweep = compose(config_name="train", overrides=["hparams_search=optuna"], return_hydra_config=True)
    assert sweep.optimized_metric == "val/loss_best" and sweep.hydra.sweeper.direction == "minimize"


class SaturatingAUROC(pl.LightningModule):
    """Logs scripted validation values: AUROC reaches 1.0 at epoch 1 and stays there, the loss keeps falling."""

    AUROC = (0.9, 1.0, 1.0, 1.0, 1.0, 1.0)
    LOSS = (0.6, 0.5, 0.4, 0.3, 0.2, 0.1)

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.weight * batch).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.LOSS[self.current_epoch])
        self.log("val/auroc", self.AUROC[self.current_epoch])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return DataLoader(torch.zeros(2, 1), batch_size=2)

    def val_dataloader(self):
        return DataLoader(torch.zeros(2, 1), batch_size=2)


def test_selection_on_the_loss_does_not_stop_at_the_first_saturated_epoch(tmp_path):
    """On easy data AUROC hits 1.0 early; selecting on it would keep epoch 1 and stop three epochs later."""
    cfg = compose_config("train", [*FAST_RUN, "trainer.max_epochs=6", f"output_dir={tmp_path}"])
    trainer = build_trainer(cfg)
    trainer.fit(SaturatingAUROC())
    assert trainer.current_epoch == 6  # all six epochs: the loss improved every time
    assert trainer.checkpoint_callback.best_model_score.item() == pytest.approx(0.1)
    assert trainer.checkpoint_callback.best_model_path.endswith("epoch005.ckpt")


def test_thresholds_chosen_on_validation_reach_the_target_sensitivity_there(cache_dir, tmp_path):
    # float32, as the probabilities below are computed (the run chooses at its own precision)
    cfg, metrics = train(tmp_path, "task.target_sensitivity=0.95", "trainer.precision=32-true")
    from ich.data.datamodule import ICHDataModule

    checkpoint = next((tmp_path / "checkpoints").glob("epoch*.ckpt"))
    model = ICHLitModule.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    datamodule = ICHDataModule.from_config(cfg)
    datamodule.setup()
    with torch.no_grad():
        batches = [(model.probabilities(model(b["image"]))[:, 0], b["target"][:, 0]) for b in datamodule.val_dataloader()]
    probs, truth = (torch.cat(parts).numpy() for parts in zip(*batches))
    threshold = float(model.op_thresholds[0])
    positives = probs[truth == 1]
    assert len(positives) and threshold != cfg.task.threshold
    assert (positives >= threshold).mean() >= 0.95
    # and it is the most specific such threshold: any higher one misses the target
    assert (positives >= np.nextafter(np.float32(threshold), np.float32(1))).mean() < 0.95
    assert metrics["test/op_threshold"] == pytest.approx(threshold)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]  # resumes carry them too
    assert torch.equal(last["op_thresholds"], model.op_thresholds) and torch.equal(last["temperature"], model.temperature)


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


def test_a_misspelt_backbone_is_told_before_any_data_is_written(tmp_path):
    cache = tmp_path / "cache"
    cfg = compose_config("train", [*FAST_RUN, "model.backbone=resnet_18", f"data.cache_dir={cache}",
                                   f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match="did you mean resnet18"):
        run(cfg)
    assert not cache.exists() or not any(cache.iterdir()), "the phantom was written before the name was checked"


def test_prepare_prints_the_index_summary(cache_dir, tmp_path):
    result = run_cli("-m", "ich.prepare", *[o for o in FAST_RUN if o.startswith("data.phantom")],
                     f"data.cache_dir={cache_dir}")
    assert result.returncode == 0, result.stderr
    assert "files found: 60" in result.stdout and "read: 59" in result.stdout
    assert "images with any:" in result.stdout

