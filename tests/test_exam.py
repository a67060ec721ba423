"""One exam everywhere: the test stage, evaluate.py and predict.py give the same exam probabilities for the same
phantom studies; exam intervals resample patients; stage 2's exam output has its own operating point, and its
checkpoint predicts away from its encoder's run."""

import shutil

import numpy as np
import pandas as pd
import pydicom
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from conftest import FAST_RUN, compose_config, make_datamodule
from ich.core.privacy import pseudonym
from ich.evaluate import run as evaluate
from ich.evaluation.exam import exam_metrics, exams_of
from ich.inference.answer import Predictor, predict_study
from ich.inference.study import scan_folder
from ich.predict import run as predict
from ich.train import run as train
from ich.training.module import ICHLitModule, portable_hparams
from ich.training.sequence import SequenceLitModule
from test_order import write_slice

# Its module fixtures train once; under pytest-xdist (`--dist loadgroup`) the module stays on one worker.


def test_slices_training_would_not_have_tested_count_in_no_exam_of_predict(tmp_path):
    """With data.min_brain_fraction=0.2 the test stage has no blank slice, so predict.py's exam must not either. A
    stand-in model scores each slice by its share of air: the two blank slices (all air) score 1.0, the eight head
    slices (half air, half brain) 0.5, so the exam is 0.5 with the filter and 1.0 without; a series of blanks only
    is not read at all."""
    head = np.full((32, 32), -1000, np.int16)
    head[:, 16:] = 40  # brain density on the right half: brain fraction 0.5
    for k in range(10):
        write_slice(tmp_path / "head" / f"{k}.dcm", head if 1 <= k <= 8 else np.full((32, 32), -1000, np.int16),
                    (0.0, 0.0, 5.0 * k), (1, 0, 0, 0, 1, 0), "1.2.3.4.1", InstanceNumber=k + 1)
        write_slice(tmp_path / "air" / f"{k}.dcm", np.full((32, 32), -1000, np.int16), (0.0, 0.0, 5.0 * k),
                    (1, 0, 0, 0, 1, 0), "1.2.3.4.2", InstanceNumber=k + 1)

    def air_share(hu, stacks, positions, scored):
        probs = (hu[stacks[:, 0]] < -500).mean(axis=(1, 2))[:, None]
        return probs, probs[scored].max(axis=0)

    def exam(min_brain: float):
        model = Predictor(labels=("any",), thresholds=np.array([0.5]), exam_thresholds=np.array([0.5]),
                          thresholds_chosen=True, task="binary", source=tmp_path, exam_rule="", series=air_share,
                          inputs={"image_size": 32, "context": 0, "min_brain_fraction": min_brain})
        return predict_study(scan_folder(tmp_path, min_slices=1).studies[0], model, min_slices=1)

    filtered, unfiltered = exam(0.2), exam(0.0)
    assert filtered.exam[0] == pytest.approx(0.5) and unfiltered.exam[0] == pytest.approx(1.0)
    reasons = {series.number or series.key: series.reason for series in filtered.study.series}
    assert sorted(reasons.values()) == ["", "blank"]


def test_exam_intervals_resample_patients_so_a_patients_two_studies_move_together():
    """Patient A holds both positive studies, one called (0.9) and one missed (0.2) at 0.5: every resample that
    draws A draws both, so the exam sensitivity is 1/2 in each (resampling studies would give 0, 1/2 or 1)."""
    probs = np.array([[0.9], [0.2], [0.1], [0.3]])
    truth = np.array([[1], [1], [0], [0]])
    exams = exams_of(probs, truth, np.array(["s1", "s2", "s3", "s4"]), np.array(["A", "A", "B", "C"]))
    metrics = exam_metrics(exams, 0, 0.5, resamples=200, seed=0)
    assert metrics["test/exam_op_sensitivity"] == 0.5
    assert metrics["test/exam_op_sensitivity_ci_low"] == metrics["test/exam_op_sensitivity_ci_high"] == 0.5
    assert metrics["test/exam_op_specificity_ci_low"] == metrics["test/exam_op_specificity_ci_high"] == 1.0
    assert metrics["data/exams_test"] == 4


# --- the same studies through the test stage, evaluate.py and predict.py -----------------------------------


def train_run(path, cache_dir, *overrides):
    """A training run folder as `python train.py` leaves it (precision auto: bf16 on a CPU with native bf16)."""
    cfg = compose_config("train", [*FAST_RUN, f"output_dir={path}", f"data.cache_dir={cache_dir}", *overrides])
    (path / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, path / ".hydra" / "config.yaml", resolve=True)  # Hydra's job, which compose skips
    return train(cfg)


def copy_test_studies(run_dir, cache_dir, tmp_path, folder):
    """The DICOM files of every slice of the run's test patients, copied to `folder` as a hospital would export
    them; returns their study keys (pseudonyms of the StudyInstanceUID, read here with plain pydicom)."""
    split = pd.read_csv(run_dir / "split.csv")
    test_patients = set(split.loc[split["split"] == "test", "patient"])
    index = make_datamodule(cache_dir, tmp_path / "dm").index
    folder.mkdir()
    studies = set()
    for path in index.loc[index["patient"].isin(test_patients), "path"]:
        shutil.copy(path, folder)
        studies.add(pseudonym(str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)))
    return studies


@pytest.fixture(scope="module")
def binary_run(cache_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("train-binary")
    return path, train_run(path, cache_dir)


@pytest.mark.slow
def test_the_test_stage_evaluate_and_predict_give_each_study_the_same_exam_probability(binary_run, cache_dir,
                                                                                          tmp_path):
    run_dir, trained = binary_run
    tested = pd.read_csv(run_dir / "exams.csv").set_index("study")
    overrides = [f"ckpt_path={run_dir}"]
    evaluated_metrics = evaluate(compose_config("evaluate", [*overrides, f"output_dir={tmp_path / 'eval'}"]), overrides)
    evaluated = pd.read_csv(tmp_path / "eval" / "exams.csv").set_index("study")
    studies = copy_test_studies(run_dir, cache_dir, tmp_path, tmp_path / "export")
    predict(compose_config("predict", [f"ckpt_path={run_dir}", f"input={tmp_path / 'export'}",
                                       f"output_dir={tmp_path / 'predict'}", "min_slices=1", "heatmaps=0"]))
    predicted = pd.read_csv(tmp_path / "predict" / "studies.csv").set_index("study")

    assert set(tested.index) == set(evaluated.index) == set(predicted.index) == studies
    for table in (evaluated, predicted):
        assert np.abs(table.loc[tested.index, "prob_any"] - tested["prob_any"]).max() < 1e-6
        assert (table.loc[tested.index, "called_any"] == tested["called_any"]).all()
    assert (tested["patient"] == evaluated.loc[tested.index, "patient"]).all()
    assert evaluated_metrics["test/exam_auroc"] == trained["test/exam_auroc"]


# --- stage 2: its own exam operating point, and a checkpoint that travels -----------------------------------


@pytest.mark.slow
def test_a_stage_two_checkpoint_moved_away_from_its_encoder_predicts_its_exams_at_their_own_thresholds(
        binary_run, cache_dir, tmp_path):
    encoder_run = tmp_path / "one"
    shutil.copytree(binary_run[0], encoder_run)
    cfg = compose_config("train", [*FAST_RUN, "model=sequence", f"model.encoder={encoder_run}",
                                   "trainer.max_epochs=2", f"output_dir={tmp_path / 'two'}",
                                   f"data.cache_dir={cache_dir}"])
    trained = train(cfg)
    checkpoint = next((tmp_path / "two" / "checkpoints").glob("epoch*.ckpt"))
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    exam_threshold, slice_threshold = float(state["exam_op_thresholds"][0]), float(state["op_thresholds"][0])
    # the exam output's threshold was chosen on the validation exams (not the fixed 0.5, not the slices' one) and
    # is what the test stage reads its exams at
    assert exam_threshold not in (0.5, slice_threshold)
    assert trained["test/exam_op_threshold"] == pytest.approx(exam_threshold)
    exams = pd.read_csv(tmp_path / "two" / "exams.csv")
    assert (exams["called_any"] == (exams["prob_any"] >= exam_threshold)).all()
    positives = exams["truth_any"] == 1
    assert trained["test/exam_op_sensitivity"] == pytest.approx(exams.loc[positives, "called_any"].mean(), nan_ok=True)

    # the checkpoint alone, elsewhere, with its encoder's run folder gone
    moved = tmp_path / "elsewhere" / "stage2.ckpt"
    moved.parent.mkdir()
    shutil.copy(checkpoint, moved)
    shutil.rmtree(encoder_run)
    shutil.rmtree(tmp_path / "two")
    copy_test_studies(binary_run[0], cache_dir, tmp_path, tmp_path / "export")
    predict(compose_config("predict", [f"ckpt_path={moved}", f"input={tmp_path / 'export'}",
                                       f"output_dir={tmp_path / 'predict'}", "min_slices=1", "heatmaps=0"]))
    predicted = pd.read_csv(tmp_path / "predict" / "studies.csv").set_index("study")
    assert np.allclose(predicted["threshold_any"], exam_threshold) and (predicted["slices"] > 0).all()
    assert (predicted["called_any"] == (predicted["prob_any"] >= exam_threshold)).all()
    # the test stage embedded the slices once into float16 features; predict.py embeds in float32
    tested = exams.set_index("study").loc[predicted.index, "prob_any"]
    assert np.allclose(predicted["prob_any"], tested, atol=1e-2)


def saved_stage_two(path, task: str, source: str) -> None:
    """A stage-2 checkpoint, untrained, over an untrained encoder of `task` whose inputs came from `source`."""
    windows = None if source == "images" else [[40.0, 80.0]]
    inputs = {"source": source, "windows": windows, "context": 0, "image_size": 64, "channels": 3}
    encoder = ICHLitModule(task=task, backbone="test_resnet", inputs=inputs)
    reference = {"path": "/gone/encoder.ckpt", "sha256": "0" * 64, "backbone": "test_resnet",
                 "hparams": portable_hparams(dict(encoder.hparams))}
    model = SequenceLitModule(task=task, features=encoder.backbone.num_features, encoder=reference, inputs=inputs)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "pytorch-lightning_version": pl.__version__}, path)


@pytest.mark.parametrize(("task", "source", "message"), [
    ("binary", "images", r"stage2\.ckpt was trained over an encoder of PNG/JPG slices of an unknown window"),
    ("subtype", "phantom", r"stage2\.ckpt is a stage-2 subtype model, whose exam output is not trained"),
])
def test_predict_refuses_a_stage_two_model_it_cannot_answer_for_in_one_sentence(tmp_path, task, source, message):
    saved_stage_two(tmp_path / "stage2.ckpt", task, source)
    (tmp_path / "input").mkdir()
    with pytest.raises(ValueError, match=message):
        predict(compose_config("predict", [f"ckpt_path={tmp_path / 'stage2.ckpt'}", f"input={tmp_path / 'input'}",
                                           f"output_dir={tmp_path / 'out'}"]))
