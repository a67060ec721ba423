"""Evaluation of real checkpoints, trained once per module on phantom DICOMs with the real conf/."""

import json
import logging
import math
import os
import subprocess
import sys

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from conftest import FAST_RUN, SMALL_PHANTOM, compose_config
from ich import CONFIG_DIR
from ich.core.tasks import LABELS, SUBTYPES
from ich.data.phantom import generate
from ich.evaluate import data_config, run, submission_rows
from ich.train import run as train

# Its module fixtures train or write the data once; under pytest-xdist (`--dist loadgroup`) the module
# stays on one worker so that they are not built again on another.

ROOT = CONFIG_DIR.parent
FILES = ("metrics.json", "predictions.csv", "confusion_matrix.png", "roc.png", "reliability.png", "report.html",
         "series_ood.csv")


def train_run(path, cache_dir, *overrides):
    """A training run folder as `python train.py` leaves it: .hydra/config.yaml, split.csv, checkpoints/."""
    # precision auto (bf16 on a CPU with native bf16, float32 elsewhere), which the checkpoint carries: evaluate.py
    # predicts at it by default, so the test stage of training and the evaluation see the same probabilities
    cfg = compose_config("train", [*FAST_RUN, f"output_dir={path}", f"data.cache_dir={cache_dir}", *overrides])
    (path / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, path / ".hydra" / "config.yaml", resolve=True)  # Hydra's job, which compose skips
    return train(cfg)


def evaluate(checkpoint, output_dir, *overrides):
    """Evaluate as `python evaluate.py ckpt_path=... <overrides>` would, with the overrides passed explicitly."""
    overrides = [f"ckpt_path={checkpoint}", *overrides]
    cfg = compose_config("evaluate", [*overrides, f"output_dir={output_dir}"])
    return run(cfg, overrides)


@pytest.fixture(scope="module")
def multilabel(cache_dir, tmp_path_factory):
    """The best checkpoint of a calibrated multilabel run (the one its test stage used) and the run's metrics."""
    path = tmp_path_factory.mktemp("train-multilabel")
    metrics = train_run(path, cache_dir, "task=multilabel", "task.calibrate=true")
    return next((path / "checkpoints").glob("epoch*.ckpt")), metrics


@pytest.fixture(scope="module")
def test_folder(tmp_path_factory):
    """Unlabelled DICOMs standing in for Kaggle's stage_2_test/."""
    root = tmp_path_factory.mktemp("kaggle")
    generate(root, patients=2, slices=3, size=64, seed=7, quirks=False)
    return root / "stage_2_train"


@pytest.fixture(scope="module")
def evaluation(multilabel, test_folder, tmp_path_factory):
    """`python evaluate.py ckpt_path=<run folder>`: the folder stands for the run's best checkpoint."""
    output_dir = tmp_path_factory.mktemp("evaluate")
    return output_dir, evaluate(multilabel[0].parent.parent, output_dir, f"test_dir={test_folder}")


def test_writes_every_result_file(evaluation):
    output_dir, metrics = evaluation
    for name in FILES:
        assert (output_dir / name).stat().st_size > 0, name
    written = json.loads((output_dir / "metrics.json").read_text())
    # first what the model was trained on, then the metrics evaluate.py returned
    assert written.pop("training_source").startswith("Trained on the synthetic phantom")
    assert written == pytest.approx({name: None if np.isnan(value) else value for name, value in metrics.items()})


def test_tests_the_training_runs_test_patients(multilabel, evaluation):
    checkpoint, _ = multilabel
    split = pd.read_csv(checkpoint.parent.parent / "split.csv")
    test = split[split["split"] == "test"].set_index("image_id")
    predictions = pd.read_csv(evaluation[0] / "predictions.csv")
    assert sorted(predictions["image_id"]) == sorted(test.index)
    assert (predictions["patient"] == test.loc[predictions["image_id"], "patient"].to_numpy()).all()
    assert evaluation[1]["data/slices_test"] == len(test)


def test_predictions_have_a_target_and_a_probability_per_label(evaluation):
    predictions = pd.read_csv(evaluation[0] / "predictions.csv")
    assert list(predictions.columns) == [
        "image_id", "patient", *(f"target_{name}" for name in LABELS), *(f"prob_{name}" for name in LABELS)
    ]
    assert predictions[[f"target_{name}" for name in LABELS]].isin([0, 1]).all().all()
    probs = predictions[[f"prob_{name}" for name in LABELS]].to_numpy()
    assert ((probs >= 0) & (probs <= 1)).all()


def test_metrics_match_the_training_runs_test_stage(multilabel, evaluation):
    """Same checkpoint, same slices, same metric objects: the same names and values as train.py's test stage."""
    _, trained = multilabel
    _, metrics = evaluation
    tested = {name: value for name, value in trained.items() if name.startswith("test/") and name != "test/loss"}
    assert {"test/auroc", "test/acc", "test/logloss_weighted", "test/sensitivity_epidural", "test/op_sensitivity",
            "test/op_sensitivity_ci_low_any", "test/auroc_ci_high", "test/ece_uncalibrated", "test/exam_auroc"} <= set(tested)
    assert {name for name in metrics if name.startswith("test/")} == set(tested)
    assert {name: metrics[name] for name in tested} == pytest.approx(tested, abs=1e-5, nan_ok=True)


def test_evaluation_applies_the_thresholds_and_temperature_the_checkpoint_carries(multilabel, tmp_path):
    """A copy of the .ckpt, away from its run folder: what it carries decides the operating point and probabilities."""
    checkpoint = torch.load(multilabel[0], weights_only=True)
    thresholds, temperature = checkpoint["state_dict"]["op_thresholds"], checkpoint["state_dict"]["temperature"]
    assert temperature.item() != 1.0  # task.calibrate=true fitted one on validation
    copy = tmp_path / "copy" / "model.ckpt"
    copy.parent.mkdir()
    torch.save(checkpoint, copy)
    metrics = evaluate(copy, tmp_path / "as-saved")
    assert [metrics[f"test/op_threshold_{label}"] for label in LABELS] == pytest.approx(thresholds.tolist())
    assert metrics["test/ece"] != metrics["test/ece_uncalibrated"]

    checkpoint["state_dict"]["op_thresholds"] = torch.zeros(len(LABELS))  # every slice at or above: all positive
    checkpoint["state_dict"]["temperature"] = torch.tensor(1e6)  # every probability 0.5
    torch.save(checkpoint, copy)
    edited = evaluate(copy, tmp_path / "edited")
    assert edited["test/op_threshold"] == 0.0 and edited["test/op_sensitivity"] == 1.0 and edited["test/op_specificity"] == 0.0
    probs = pd.read_csv(tmp_path / "edited" / "predictions.csv")[[f"prob_{label}" for label in LABELS]].to_numpy()
    assert probs == pytest.approx(0.5, abs=1e-5)


def test_figures_are_drawn(evaluation):
    for name in ("confusion_matrix.png", "roc.png", "reliability.png"):
        image = matplotlib.image.imread(evaluation[0] / name)
        assert image.shape[0] > 400 and image.shape[1] > 400, name
        assert image[..., :3].std() > 0.05, f"{name} is blank"


def test_submission_has_six_rows_per_test_image(evaluation, test_folder):
    rows = pd.read_csv(evaluation[0] / "submission.csv")
    assert list(rows.columns) == ["ID", "Label"]
    images = sorted(path.stem for path in test_folder.glob("*.dcm"))
    assert len(rows) == 6 * len(images)
    assert sorted(rows["ID"]) == sorted(f"{image}_{label}" for image in images for label in LABELS)
    assert rows["Label"].between(1e-6, 1 - 1e-6).all()


def test_submission_probabilities_are_clipped_away_from_0_and_1():
    rows = submission_rows(["ID_a"], torch.tensor([[0.0, 1.0, 0.5, 0.2, 1e-9, 1 - 1e-9]], dtype=torch.float64))
    assert list(rows["ID"]) == [f"ID_a_{label}" for label in LABELS]
    assert rows["Label"].tolist() == pytest.approx([1e-6, 1 - 1e-6, 0.5, 0.2, 1e-6, 1 - 1e-6], abs=1e-12)


def test_other_data_is_used_whole_as_external_validation(multilabel, cache_dir, tmp_path, caplog):
    """A phantom other than training's is used whole: every one of its slices is a test slice."""
    overrides = ["data=phantom", f"data.cache_dir={cache_dir}", "data.phantom.patients=3", "data.phantom.slices=4",
                 "data.phantom.size=64", "data.phantom.quirks=false", "data.num_workers=0"]
    with caplog.at_level(logging.INFO, logger="ich"):
        metrics = evaluate(multilabel[0], tmp_path, *overrides)
    assert metrics["data/slices_test"] == 3 * 4
    assert "External validation" in caplog.text
    assert len(pd.read_csv(tmp_path / "predictions.csv")) == 3 * 4


def test_external_data_that_holds_training_slices_is_flagged(multilabel, cache_dir, tmp_path, caplog):
    """The training phantom under other settings: external by its config, yet it holds the training slices."""
    data = [o for o in FAST_RUN if o.startswith("data.")] + [f"data.cache_dir={cache_dir}", "data.phantom.quirks=false"]
    with caplog.at_level(logging.INFO, logger="ich"):
        evaluate(multilabel[0], tmp_path / "all", "data=phantom", *data)
    assert "train/val slices of the training run, so these metrics are optimistic" in caplog.text
    split_csv = multilabel[0].parent.parent / "split.csv"
    evaluate(multilabel[0], tmp_path / "split", "data=phantom", *data, f"data.split_file={split_csv}")
    split = pd.read_csv(split_csv)
    tested = set(pd.read_csv(tmp_path / "split" / "predictions.csv")["image_id"])
    assert tested and tested <= set(split.loc[split["split"] == "test", "image_id"])


def test_chosen_data_keeps_trainings_preprocessing_unless_given(tmp_path):
    cfg = compose_config("evaluate", ["ckpt_path=x", "data=phantom", "data.image_size=32", f"output_dir={tmp_path}"])
    trained = {**OmegaConf.to_container(cfg.data, resolve=True), "windows": ["brain"], "context": 1, "image_size": 64}
    inputs = {"windows": [[40.0, 80.0]], "context": 1, "image_size": 64}  # what the checkpoint says of them
    data = data_config(cfg, trained, {"data.image_size"}, tmp_path, inputs)
    assert data["windows"] == [[40.0, 80.0]] and data["context"] == 1  # as in training
    assert data["image_size"] == 32  # given on the command line
    assert data["split"] != [0.0, 0.0, 1.0]  # the training data itself: its test patients only


def test_default_data_is_the_training_runs_with_tweaks_on_top(multilabel, tmp_path):
    run_dir = multilabel[0].parent.parent
    cfg = compose_config("evaluate", ["ckpt_path=x", "+data.image_size=32", "batch_size=2", f"output_dir={tmp_path}"])
    trained = torch.load(multilabel[0], weights_only=True)["hyper_parameters"]["data"]  # what the checkpoint says
    assert trained == OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml").data, resolve=True)
    inputs = torch.load(multilabel[0], weights_only=True)["hyper_parameters"]["inputs"]
    data = data_config(cfg, trained, {"data.image_size", "batch_size"}, run_dir, inputs)
    assert data == {**trained, "image_size": 32, "batch_size": 2, "split_file": str(run_dir / "split.csv")}


def one_batch_checkpoint(cache_dir, tmp_path_factory, task: str):
    """A checkpoint after one training batch: enough to check a task's evaluation path, cheaply."""
    path = tmp_path_factory.mktemp(f"train-{task}")
    train_run(path, cache_dir, f"task={task}", "test=false", "+trainer.limit_train_batches=1",
              "+trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0")
    return path / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def subtype(cache_dir, tmp_path_factory):
    return one_batch_checkpoint(cache_dir, tmp_path_factory, "subtype")


def test_subtype_targets_are_subtype_names(subtype, tmp_path):
    evaluate(subtype, tmp_path)
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    assert list(predictions.columns) == ["image_id", "patient", "target", *(f"prob_{name}" for name in SUBTYPES)]
    assert len(predictions) > 0 and predictions["target"].isin(SUBTYPES).all()
    assert predictions[[f"prob_{name}" for name in SUBTYPES]].sum(axis=1).to_numpy() == pytest.approx(1.0, abs=1e-5)
    assert (tmp_path / "confusion_matrix.png").is_file() and (tmp_path / "roc.png").is_file()


def test_context_other_than_the_checkpoints_names_the_setting(multilabel, cache_dir, tmp_path):
    with pytest.raises(ValueError, match=r"data.context=1 differs from the checkpoint's 0"):
        evaluate(multilabel[0], tmp_path, "data=phantom", f"data.cache_dir={cache_dir}", "data.context=1",
                 *(o for o in FAST_RUN if o.startswith("data.")))


def test_windows_other_than_the_checkpoints_are_refused_even_with_as_many_channels(multilabel, tmp_path):
    """Three other windows still make three channels: the checkpoint, not the channel count, decides."""
    with pytest.raises(ValueError, match=r"^data.windows=\[\[40.0, 80.0\], \[600.0, 2800.0\], \[80.0, 200.0\]\] differs "
                                         r"from the checkpoint's \[\[40.0, 80.0\], \[80.0, 200.0\], \[600.0, 2800.0\]\]"):
        evaluate(multilabel[0], tmp_path, "+data.windows=[brain,bone,subdural]")


def test_a_checkpoint_copied_away_from_its_deleted_run_folder_evaluates_alone(cache_dir, tmp_path):
    """The .ckpt says how its inputs were made and which data it learnt from: no run folder needed."""
    import shutil

    run_dir = tmp_path / "run"
    train_run(run_dir, cache_dir, "task=binary", "test=false", "+trainer.limit_train_batches=1",
              "+trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0", "data.windows=[brain,[60,120]]")
    with_run = evaluate(run_dir, tmp_path / "with-run")
    carried = tmp_path / "elsewhere" / "model.ckpt"
    carried.parent.mkdir()
    shutil.copy(run_dir / "checkpoints" / "last.ckpt", carried)
    shutil.rmtree(run_dir)
    alone = evaluate(carried, tmp_path / "alone")
    assert alone == pytest.approx(with_run, nan_ok=True)
    tested = [pd.read_csv(tmp_path / name / "predictions.csv") for name in ("with-run", "alone")]
    pd.testing.assert_frame_equal(*tested)  # the same test patients, drawn again from the saved split seed


@pytest.fixture(scope="module")
def binary(cache_dir, tmp_path_factory):
    return one_batch_checkpoint(cache_dir, tmp_path_factory, "binary")


def test_binary_checkpoint_reports_the_any_label(binary, tmp_path):
    metrics = evaluate(binary, tmp_path)
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    assert list(predictions.columns) == ["image_id", "patient", "target_any", "prob_any"]
    assert {"test/acc", "test/sensitivity", "test/specificity"} <= set(metrics)
    assert not any(name.endswith("_any") for name in metrics)  # one output: no per-class copies
    assert all((tmp_path / name).is_file() for name in FILES)


def test_test_dir_needs_a_multilabel_checkpoint(binary, tmp_path, test_folder):
    with pytest.raises(ValueError, match="needs all six labels: train with task=multilabel"):
        evaluate(binary, tmp_path, f"test_dir={test_folder}")


def test_a_run_folder_without_one_best_checkpoint_says_what_to_pass(tmp_path):
    from ich.core.runs import best_checkpoint

    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no checkpoints"):
        best_checkpoint(tmp_path)
    (tmp_path / "checkpoints" / "last.ckpt").touch()
    assert best_checkpoint(tmp_path).name == "last.ckpt"  # validation never saved a best one
    for name in ("epoch001-auroc0.9000.ckpt", "epoch003-auroc0.9500.ckpt"):
        (tmp_path / "checkpoints" / name).touch()
    with pytest.raises(ValueError, match="holds 2 checkpoints besides last.ckpt: pass the one to test"):
        best_checkpoint(tmp_path)


def test_nonexistent_checkpoint_gives_one_sentence(tmp_path):
    with pytest.raises(FileNotFoundError, match="ckpt_path=/no/such.ckpt does not exist: pass a .ckpt written"):
        evaluate("/no/such.ckpt", tmp_path)


@pytest.mark.slow
def test_command_without_checkpoint_gives_one_sentence_not_a_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    env.pop("HYDRA_FULL_ERROR", None)
    result = subprocess.run([sys.executable, "evaluate.py", f"hydra.run.dir={tmp_path}"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "Evaluation needs a checkpoint: pass ckpt_path=PATH" in result.stderr
    assert "Traceback" not in result.stderr


def test_report_shows_the_operating_point_and_tiles_without_identifiers(evaluation):
    """report.html: self-contained, the checkpoint's operating point, worst cases as images, no ids."""
    output_dir, _ = evaluation
    page = (output_dir / "report.html").read_text()
    predictions = pd.read_csv(output_dir / "predictions.csv")
    assert "http://" not in page and "https://" not in page
    assert "operating point" in page and page.count("data:image/png;base64,") >= 4
    assert not any(value in page for value in [*predictions["image_id"], *predictions["patient"].astype(str)])


def test_a_local_operating_point_is_chosen_on_a_share_of_the_new_patients_and_tested_on_the_others(
        binary, cache_dir, tmp_path):
    """local_operating_point=0.5 on another phantom (every slice a test slice): the threshold is the checkpoint's
    rule (the highest threshold reaching 95% sensitivity) applied to half of the patients' slices, computed here by
    hand from a full evaluation's probabilities, and only the other half is tested at it."""
    other = ["data=phantom", *SMALL_PHANTOM, "data.phantom.patients=12", "data.phantom.seed=5",
             f"data.cache_dir={cache_dir}"]
    full = evaluate(binary, tmp_path / "full", *other)
    local = evaluate(binary, tmp_path / "local", *other, "local_operating_point=0.5")
    everyone = pd.read_csv(tmp_path / "full" / "predictions.csv")
    tested = pd.read_csv(tmp_path / "local" / "predictions.csv")
    chosen_on = everyone[~everyone["patient"].isin(tested["patient"])]
    assert everyone["patient"].nunique() == 12 and chosen_on["patient"].nunique() == 6
    assert set(tested["image_id"]) == set(everyone["image_id"]) - set(chosen_on["image_id"])
    assert local["data/slices_test"] == len(tested) and local["data/local_op_slices"] == len(chosen_on)
    positives = np.sort(chosen_on.loc[chosen_on["target_any"] == 1, "prob_any"].to_numpy())[::-1]
    expected = positives[math.ceil(0.95 * len(positives)) - 1]  # the lowest probability that must still be called
    assert local["test/op_threshold"] == pytest.approx(expected, abs=1e-6)
    assert full["test/op_threshold"] != pytest.approx(expected, abs=1e-6)  # the checkpoint's, from validation
    report = (tmp_path / "local" / "report.html").read_text()
    assert "chosen on 6 of these 12 patients (local_operating_point=0.5)" in report
    with pytest.raises(ValueError, match="local_operating_point=1.5 takes a share between 0 and 1"):
        evaluate(binary, tmp_path / "bad", *other, "local_operating_point=1.5")
