"""Sweeps: plain Hydra multiruns, an Optuna study that outlives a failing trial, and the sweep summary."""

import json
import math
import os
import subprocess
import sys

import optuna
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch

from conftest import FAST_RUN
from ich import CONFIG_DIR
from ich.report import summarize
from ich.training.callbacks import FiniteLossCheck
from test_wandb import of_type, wandb_records

ROOT = CONFIG_DIR.parent


def run_cli(*args, timeout=400):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_multirun_gives_each_job_its_folder_metrics_and_wandb_run_and_report_ranks_them(cache_dir, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli("train.py", "-m", *FAST_RUN, "task=binary,multilabel", "logger=wandb", "test=false",
                     f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = [sweep / "0", sweep / "1"]
    metrics = [json.loads((job / "metrics.json").read_text()) for job in jobs]
    assert all("val/auroc_best" in m for m in metrics)
    assert "val/loss_best" in metrics[0] and "val/logloss_weighted_best" in metrics[1]  # each task's optimized_metric

    # each job its own W&B run, grouped by the sweep folder, named by what it changed
    runs = [of_type(wandb_records(next((job / "wandb").glob("offline-run-*"))), "run")[0] for job in jobs]
    assert runs[0].run_id != runs[1].run_id
    assert {r.run_group for r in runs} == {str(sweep)}
    assert "task=binary" in runs[0].display_name and "task=multilabel" in runs[1].display_name

    report = run_cli("-m", "ich.report", str(sweep))
    assert report.returncode == 0, report.stderr
    table = pd.read_csv(sweep / "summary.csv")
    assert set(table["run"]) == {"task=binary", "task=multilabel"}  # the overrides both jobs share are left out
    # ranked by the first job's optimized_metric, val/loss_best, lowest first: the multilabel job has none, so comes last
    assert list(table["run"]) == ["task=binary", "task=multilabel"]
    assert "| task=" in (sweep / "summary.md").read_text()
    assert (sweep / "summary.png").stat().st_size > 5_000
    page = (sweep / "summary.html").read_text()
    assert "task=binary" in page and "task=multilabel" in page and "data:image/png;base64," in page


@pytest.mark.slow
def test_optuna_study_scores_a_failing_trial_worst_and_continues_in_the_same_folder(cache_dir, tmp_path):
    sweep = tmp_path / "study"
    common = ["hparams_search=optuna", *FAST_RUN, "test=false", f"hydra.sweep.dir={sweep}"]
    # seed 1 proposes test_resnet, then a backbone that does not exist: the second trial fails
    first = run_cli("train.py", "-m", *common, "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.seed=1",
                    "model.backbone=choice(test_resnet,no_such_net)")
    assert first.returncode == 0, first.stderr[-3000:]
    # the same command in the same folder continues the study (here with one more trial that fails at once)
    second = run_cli("train.py", "-m", *common, "hydra.sweeper.n_trials=1", "model.backbone=no_such_net")
    assert second.returncode == 0, second.stderr[-3000:]

    study = optuna.load_study(study_name="ich", storage=f"sqlite:///{sweep}/optuna.db")
    trials = study.trials
    assert len(trials) == 3 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    backbones = [t.params.get("model.backbone") or t.user_attrs["model.backbone"] for t in trials]  # sampled or fixed
    assert backbones == ["test_resnet", "no_such_net", "no_such_net"]
    assert [t.value for t in trials[1:]] == [math.inf, math.inf]  # the worst for a minimised loss
    assert math.isfinite(trials[0].value) and study.best_value == trials[0].value
    assert "Unknown backbone 'no_such_net'" in first.stderr + first.stdout  # logged with the trial's overrides

    job_folders = [p for p in sweep.iterdir() if (p / ".hydra").is_dir()]
    assert len(job_folders) == 3  # the continued study did not overwrite the first trials' folders
    table = summarize(sweep)
    assert list(table["status"]) == ["done", "no metrics.json", "no metrics.json"]


def make_job(folder, overrides: list[str], metrics: dict | None):
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (folder / ".hydra" / "config.yaml").write_text("optimized_metric: val/auroc_best\n")
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics))


def test_report_sorts_by_the_optimised_metric_and_keeps_failed_jobs(tmp_path):
    make_job(tmp_path / "0", ["model=resnet18", "task=binary"], {"val/auroc_best": 0.71, "test/acc": 0.8})
    make_job(tmp_path / "1", ["model=densenet121", "task=binary"], {"val/auroc_best": 0.93, "test/acc": 0.9})
    make_job(tmp_path / "2", ["model=xception", "task=binary"], None)
    make_job(tmp_path / "3", ["model=resnet50", "task=binary"], {"val/auroc_best": None, "test/acc": 0.5})
    table = summarize(tmp_path)
    # best first; jobs without a value keep their folder order at the bottom
    assert list(table["run"]) == ["model=densenet121", "model=resnet18", "model=xception", "model=resnet50"]
    assert list(table.columns[:2]) == ["run", "val/auroc_best"]
    markdown = (tmp_path / "summary.md").read_text()
    assert markdown.index("densenet121") < markdown.index("resnet18") < markdown.index("xception")
    assert "no metrics.json" in markdown
    by_accuracy = summarize(tmp_path, metric="test/acc")
    assert list(by_accuracy["run"][:3]) == ["model=densenet121", "model=resnet18", "model=resnet50"]


def test_report_of_a_folder_without_jobs_says_what_to_pass(tmp_path):
    result = run_cli("-m", "ich.report", str(tmp_path))
    assert result.returncode == 1
    assert "No job folders" in result.stderr and "Traceback" not in result.stderr


def test_a_nan_loss_stops_training_with_a_sentence():
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    check = FiniteLossCheck()
    check.on_train_batch_end(trainer, None, {"loss": torch.tensor(0.7)}, None, 0)  # a finite loss passes
    with pytest.raises(ValueError, match="train/loss became nan .* lower optimizer.lr"):
        check.on_train_batch_end(trainer, None, {"loss": torch.tensor(float("nan"))}, None, 0)
