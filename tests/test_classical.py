"""Frozen-backbone features with scikit-learn classifiers, one task or one label at a time, on phantom DICOMs."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import skops.io as sio
import timm
import torch
from sklearn.base import BaseEstimator, ClassifierMixin

from conftest import SMALL_PHANTOM, compose_config
from ich import CONFIG_DIR
from ich.classical import features as features_module
from ich.classical.classifiers import grouped_folds, param_distributions, probabilities
from ich.classical.features import Split, load_or_extract
from ich.classical.fit import run
from ich.classical.saving import load_classifier
from ich.core.tasks import get_task
from ich.evaluate import compute_metrics

ROOT = CONFIG_DIR.parent
# A tiny backbone on small slices, and a search of two settings on two folds: seconds per fit.
TINY = ["model=tiny", "data.image_size=64", "data.num_workers=0", "data.batch_size=16", *SMALL_PHANTOM]
QUICK_SEARCH = ["classifier.search.n_iter=2", "classifier.search.cv=2", "classifier.search.top_k=2"]
# Spaces that fit the small phantom (a few dozen training slices) and stay fast.
SMALL_SPACES = {
    "knn": ["classifier.search.space.n_neighbors=[1,3,5]"],
    "rf": ["classifier.search.space.n_estimators=[20]", "classifier.search.space.max_depth=[4]"],
}


# The Keras paper's seventeen backbones -> our conf/model files (docs/how-to/classical.md: "The seventeen Keras backbones").
KERAS_BACKBONES = {
    "Xception": "xception", "VGG16": "vgg16", "VGG19": "vgg19", "ResNet50": "resnet50", "ResNet101": "resnet101",
    "ResNet152": "resnet152", "ResNet50V2": "resnet50v2", "ResNet101V2": "resnet101v2",
    "ResNet152V2": "resnet152v2", "InceptionV3": "inception_v3", "InceptionResNetV2": "inception_resnet_v2",
    "MobileNet": "mobilenet", "MobileNetV2": "mobilenetv2", "DenseNet121": "densenet121",
    "DenseNet169": "densenet169", "DenseNet201": "densenet201", "NASNetMobile": "nasnetmobile",
}


def fit(tmp_path, *overrides):
    cfg = compose_config("fit_classical", [*TINY, *QUICK_SEARCH, f"output_dir={tmp_path}", *overrides])
    return run(cfg)


def expected_names(task_name: str) -> set[str]:
    """The names evaluate.py (and the test stage of training) gives the same task's metrics."""
    task = get_task(task_name)
    k = task.num_outputs
    probs = torch.rand(8, k)
    targets = torch.arange(8) % k if task.loss == "ce" else (torch.arange(8)[:, None] + torch.arange(k)) % 2
    return set(compute_metrics(task, 0.5, probs, targets))


def test_features_are_cached_once_and_reused_by_the_next_run(cache_dir, tmp_path, monkeypatch):
    overrides = [*TINY, f"features_dir={tmp_path / 'features'}"]
    cfg = compose_config("extract", [*overrides, f"output_dir={tmp_path / 'first'}"])
    splits, folder = load_or_extract(cfg)
    described = json.loads((folder / "features.json").read_text())
    assert described["extractor"]["backbone"] == "test_resnet" and described["data"]["image_size"] == 64
    for split in splits.values():
        assert len(split) > 0 and split.features.shape == (len(split.targets), 96) == (len(split.image_ids), 96)
    assert described["shapes"]["train"] == [len(splits["train"]), 96]

    def no_extraction(*args):
        raise AssertionError("extracted again although the cache matches")

    monkeypatch.setattr(features_module, "extract_to", no_extraction)
    again, same_folder = load_or_extract(compose_config("extract", [*overrides, f"output_dir={tmp_path / 'second'}"]))
    assert same_folder == folder
    assert np.array_equal(again["test"].features, splits["test"].features)
    assert (tmp_path / "second" / "split.csv").is_file()

    other = compose_config("extract", [*overrides, "data.windows=[brain]", f"output_dir={tmp_path / 'third'}"])
    with pytest.raises(AssertionError, match="extracted again"):
        load_or_extract(other)  # other preprocessing: another key, so it must extract


@pytest.mark.slow
def test_extract_cli_reuses_the_cache_of_an_earlier_run(cache_dir, tmp_path):
    load_or_extract(compose_config("extract", [*TINY, f"output_dir={tmp_path / 'first'}"]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    result = subprocess.run(
        [sys.executable, "extract.py", *TINY, f"hydra.run.dir={tmp_path / 'cli'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Reusing the cached features" in result.stdout + result.stderr
    assert json.loads((tmp_path / "cli" / "features.json").read_text())["shapes"]["train"][1] == 96


def test_every_keras_backbone_of_the_paper_has_a_model_config_naming_a_timm_model():
    assert len(KERAS_BACKBONES) == 17
    for config in KERAS_BACKBONES.values():
        backbone = compose_config("extract", [f"model={config}", "output_dir=unused"]).model.backbone
        assert timm.is_model(backbone), f"conf/model/{config}.yaml: {backbone}"


def test_cross_validation_folds_never_split_a_patient():
    rng = np.random.default_rng(0)
    patients = np.repeat([f"P{i}" for i in range(12)], 5)
    targets = rng.integers(0, 2, size=(60, 1)).astype(np.float32)
    split = Split(rng.normal(size=(60, 4)), targets, np.arange(60).astype(str), patients)
    folds = grouped_folds(split, get_task("binary"), n_splits=3, seed=0)
    assert len(folds) == 3
    for train_rows, test_rows in folds:
        assert not set(patients[train_rows]) & set(patients[test_rows])
    tested = np.concatenate([test_rows for _, test_rows in folds])
    assert sorted(tested) == list(range(60))  # every slice is tested exactly once
    with pytest.raises(ValueError, match="classifier.search.cv=13 needs at least 13 training patients"):
        grouped_folds(split, get_task("binary"), n_splits=13, seed=0)


@pytest.mark.parametrize("classifier", ["svm", "knn", "rf", "logreg"])
def test_each_classifier_reports_what_end_to_end_evaluation_reports(cache_dir, tmp_path, classifier):
    metrics = fit(tmp_path, f"classifier={classifier}", *SMALL_SPACES.get(classifier, []))
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert set(written) == set(metrics)
    assert expected_names("binary") <= set(written)
    assert {name.replace("test/", "val/") for name in expected_names("binary")} <= set(written)
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    assert list(predictions.columns) == ["image_id", "patient", "target_any", "prob_any"]
    assert len(predictions) == written["data/slices_test"] > 0
    assert (tmp_path / "confusion_matrix.png").is_file() and (tmp_path / "roc.png").is_file()


@pytest.mark.parametrize("task", ["subtype", "multilabel"])
def test_subtype_and_multilabel_fit_with_their_metric_names(cache_dir, tmp_path, task):
    metrics = fit(tmp_path, f"task={task}", "classifier=logreg")
    assert expected_names(task) <= set(metrics)
    header = pd.read_csv(tmp_path / "predictions.csv").columns
    if task == "subtype":
        assert "target" in header and "prob_subdural" in header
    else:
        assert {"target_epidural", "prob_epidural"} <= set(header) and "test/logloss_weighted" in metrics


def test_a_saved_classifier_loads_alone_and_predicts_the_same(cache_dir, tmp_path):
    fit(tmp_path, "classifier=svm")
    estimator, info = load_classifier(tmp_path / "classifier.skops")
    assert info["features"]["extractor"]["backbone"] == "test_resnet"
    assert info["features"]["data"]["windows"] == ["brain", "subdural", "bone"]
    assert info["features"]["data"]["image_size"] == 64 and info["classifier"] == "svm"
    splits, _ = load_or_extract(compose_config("extract", [*TINY, f"output_dir={tmp_path / 'again'}"]))
    probs = probabilities(estimator, splits["test"].features, get_task("binary"))[:, 0]
    written = pd.read_csv(tmp_path / "predictions.csv")
    assert np.allclose(probs, written["prob_any"], atol=1e-6)
    assert list(written["image_id"]) == list(splits["test"].image_ids)


class Foreign(ClassifierMixin, BaseEstimator):
    """A class from outside scikit-learn: loading it would run code from this module."""

    def fit(self, x, y):
        return self


def test_a_classifier_file_with_foreign_types_is_refused(tmp_path):
    path = tmp_path / "foreign.skops"
    sio.dump(Foreign(), path)
    with pytest.raises(ValueError, match="holds types outside sklearn"):
        load_classifier(path)


def test_a_malformed_search_range_names_the_key():
    assert set(param_distributions({"C": {"log": [0.1, 10.0]}, "p": [1, 2]}, "clf__")) == {"clf__C", "clf__p"}
    with pytest.raises(ValueError, match=r"classifier.search.space.C="):
        param_distributions({"C": {"log": [0.1]}}, "clf__")


def test_a_per_label_classifier_fits_its_label_on_a_training_split_balanced_on_it(cache_dir, tmp_path):
    # the per-label paper's setting: pixels as features, the binary task of one label, its training split 50/50
    per_label = ["task.label=subdural", "data.balance=undersample", "features=pixels", "data.image_size=32"]
    metrics = fit(tmp_path / "fit", *per_label, "classifier=logreg")
    assert expected_names("binary") <= set(metrics)
    assert list(pd.read_csv(tmp_path / "fit" / "predictions.csv").columns) == [
        "image_id", "patient", "target_subdural", "prob_subdural"]
    assert json.loads((tmp_path / "fit" / "classifier.json").read_text())["outputs"] == ["subdural"]

    extract = [*TINY, *per_label, f"output_dir={tmp_path / 'extract'}"]
    splits, folder = load_or_extract(compose_config("extract", extract))
    assert json.loads((folder / "features.json").read_text())["outputs"] == ["subdural"]
    train = splits["train"].targets[:, 0]
    assert 0 < train.sum() and train.mean() == 0.5  # as many subdural slices as others
    assert metrics["data/slices_train"] == len(train)
    # another label is another task: its features live under another key, never read for subdural
    _, any_folder = load_or_extract(compose_config("extract", [*extract, "task.label=any"]))
    assert any_folder != folder
