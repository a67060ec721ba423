"""Scale: DistributedDataParallel with two CPU processes (gloo), and the SLURM launcher's config."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from conftest import FAST_RUN, compose_config
from ich import CONFIG_DIR
from ich.data.datamodule import ICHDataModule
from ich.evaluation.metrics import build_metrics
from ich.training.module import ICHLitModule

ROOT = CONFIG_DIR.parent
DDP_ON_CPU = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
              "trainer.sync_batchnorm=false", "trainer.channels_last=false"]


def ddp_overrides(tmp_path) -> list[str]:
    fast = [o for o in FAST_RUN if not o.startswith("trainer=")]  # trainer=ddp instead of trainer=cpu
    return [*fast, *DDP_ON_CPU, "task=multilabel", "+trainer.limit_train_batches=2", "test=false"]


def val_metrics_of(checkpoint, cfg, indices: list[int]) -> dict[str, float]:
    """The validation metrics of `checkpoint` over the given validation slices, in one process."""
    datamodule = ICHDataModule.from_config(cfg)
    datamodule.setup()
    dataset = datamodule.datasets["val"]
    model = ICHLitModule.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    metrics = build_metrics(model.task, model.hparams.threshold, prefix="val/")
    with torch.no_grad():
        for i in indices:
            item = dataset[i]
            probs = model.probabilities(model(torch.as_tensor(item["image"])[None]))
            metrics.update(probs, torch.as_tensor(item["target"])[None].long())
    return {name: float(value) for name, value in metrics.compute().items()}


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_aggregates_metrics_over_both(cache_dir, tmp_path):
    overrides = ddp_overrides(tmp_path)
    cfg = compose_config("train", [*overrides, f"output_dir={tmp_path}"])
    datamodule = ICHDataModule.from_config(cfg)
    datamodule.prepare_data()  # phantom and index written once, before the two processes read them
    datamodule.setup()
    size = len(datamodule.datasets["val"])

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    result = subprocess.run([sys.executable, "train.py", *overrides, f"hydra.run.dir={tmp_path}"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "train_ddp_process_1.log").is_file()  # Lightning relaunched train.py as rank 1
    written = json.loads((tmp_path / "metrics.json").read_text())

    # DistributedSampler deals the slices out in turn, padding with the first ones to an even count.
    indices = list(range(size)) + list(range(-size % 2))
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"  # saved right after that validation, same weights
    everything = val_metrics_of(checkpoint, cfg, indices)
    rank_zero_only = val_metrics_of(checkpoint, cfg, indices[0::2])
    for name in ("val/logloss_weighted", "val/acc"):
        assert written[name] == pytest.approx(everything[name], abs=1e-5), name
    assert not math.isclose(everything["val/logloss_weighted"], rank_zero_only["val/logloss_weighted"], abs_tol=1e-5)


@pytest.mark.slow
def test_ddp_inside_a_local_multirun_is_refused_with_a_sentence(tmp_path):
    fast = [o for o in FAST_RUN if not o.startswith("trainer=")]
    command = [sys.executable, "train.py", "-m", *fast, "trainer=ddp", "trainer.accelerator=cpu",
               f"hydra.sweep.dir={tmp_path}"]
    result = subprocess.run(
        command, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "trainer=ddp cannot run inside a local multirun" in result.stderr
    assert "Traceback" not in result.stderr


def compose_with_hydra(overrides: list[str]):
    """The config with its `hydra` node, where the launcher settings live."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def test_slurm_launcher_gives_one_task_per_gpu():
    cfg = compose_with_hydra(["launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2",
                              "hydra.launcher.partition=gpu", "output_dir=unused"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.tasks_per_node == launcher.gpus_per_node == 4 and launcher.nodes == 2
    assert launcher.partition == "gpu" and launcher.timeout_min > 0

    sweep = compose_with_hydra(["launcher=slurm", "trainer=gpu", "output_dir=unused"])
    assert sweep.hydra.launcher.tasks_per_node == sweep.hydra.launcher.gpus_per_node == 1
    assert sweep.hydra.launcher.nodes == 1
