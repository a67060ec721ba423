"""One exam everywhere: the test stage, evaluate.py and predict.py give the same exam probabilities for the same
phantom studies; exam intervals resample patients."""

import shutil

import numpy as np
import pandas as pd
import pydicom
import pytest
from omegaconf import OmegaConf

from conftest import FAST_RUN, compose_config, make_datamodule
from ich.evaluate import run as evaluate
from ich.exam import exam_metrics, exams_of
from ich.predict import run as predict
from ich.privacy import pseudonym
from ich.train import run as train

# Its module fixtures train once; under pytest-xdist (`--dist loadgroup`) the module stays on one worker.
pytestmark = pytest.mark.xdist_group("exam")


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
