"""scikit-learn classifiers on cached features, tuned as the Keras paper did, by randomized search.

A classifier is a `conf/classifier` file: the estimator (a Hydra `_target_`), whether features are
standardised first, and the search space. The search cross-validates on the training split with folds
grouped by patient, since neighbouring slices of one patient are near copies; the best few settings
are then refit on the whole training split and the validation split picks among them.
"""

import logging
import math
import warnings
from dataclasses import dataclass
from functools import partial

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from scipy.stats import loguniform, randint, uniform
from sklearn.base import BaseEstimator, clone
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import RandomizedSearchCV, StratifiedGroupKFold
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from ich.classical.features import Split
from ich.core.tasks import Task
from ich.evaluation.operating import called

log = logging.getLogger(__name__)

SCORINGS = ("auroc", "acc")
# A search space entry is a list of values, or one of these with [low, high].
DISTRIBUTIONS = {
    "log": lambda low, high: loguniform(low, high),
    "int": lambda low, high: randint(low, high + 1),
    "uniform": lambda low, high: uniform(low, high - low),
}


@dataclass(frozen=True)
class Fitted:
    """The chosen classifier, its settings, and the scores that chose it."""

    estimator: BaseEstimator
    params: dict
    cv_score: float  # mean over the grouped folds of the training split
    val_score: float  # on the validation split (NaN when undefined there)
    candidates: list[dict]  # every refit setting with its cv and validation scores


def build_estimator(classifier: DictConfig, task: Task) -> tuple[BaseEstimator, str]:
    """The configured estimator (after a StandardScaler when `scale`), one-vs-rest for multilabel.

    Returns it with the prefix its parameters have inside the wrapping, for the search space.
    """
    steps = [("scale", StandardScaler())] if classifier.scale else []
    steps.append(("clf", instantiate(classifier.estimator, _convert_="all")))
    pipeline = Pipeline(steps)
    if task.metric_task == "multilabel":
        return OneVsRestClassifier(pipeline), "estimator__clf__"
    return pipeline, "clf__"


def param_distributions(space: DictConfig | dict | None, prefix: str) -> dict:
    """`classifier.search.space` as RandomizedSearchCV distributions, keyed by the wrapped parameter names."""
    plain = OmegaConf.to_container(space) if isinstance(space, DictConfig) else dict(space or {})
    return {prefix + name: _distribution(name, spec) for name, spec in plain.items()}


def _distribution(name: str, spec: object) -> object:
    if isinstance(spec, list) and spec:
        return spec
    if isinstance(spec, dict) and len(spec) == 1:
        ((kind, bounds),) = spec.items()
        if kind in DISTRIBUTIONS and isinstance(bounds, list) and len(bounds) == 2:
            return DISTRIBUTIONS[kind](*bounds)
    raise ValueError(
        f"classifier.search.space.{name}={spec!r} is not a search range: give a list of values "
        "or one of {log: [low, high]}, {int: [low, high]}, {uniform: [low, high]}."
    )


def sklearn_targets(targets: np.ndarray, task: Task) -> np.ndarray:
    """The data module's targets as scikit-learn takes them: 0/1 [N] for binary, classes [N], or 0/1 [N, 6]."""
    if task.metric_task == "binary":
        return targets[:, 0].astype(np.int64)
    return targets.astype(np.int64)


def probabilities(estimator: BaseEstimator, features: np.ndarray, task: Task) -> np.ndarray:
    """[N, task.num_outputs] scores in the layout the deep models' probabilities have.

    Margin classifiers without probabilities (LinearSVC, a hinge-loss SGDClassifier) give the logistic
    of their margin: uncalibrated, but ranked (AUROC) and split at 0.5 (accuracy) exactly as their own
    decisions. A class missing from the training data gets probability 0.
    """
    if task.metric_task == "multilabel":
        if hasattr(estimator, "predict_proba"):
            return estimator.predict_proba(features)
        return _sigmoid(estimator.decision_function(features))
    scores = _class_scores(estimator, features)
    classes = list(estimator.classes_)
    full = np.zeros((len(features), max(task.num_outputs, 2)), dtype=np.float64)
    full[:, classes] = scores
    return full[:, 1:] if task.metric_task == "binary" else full


def _class_scores(estimator: BaseEstimator, features: np.ndarray) -> np.ndarray:
    if hasattr(estimator, "predict_proba"):
        return estimator.predict_proba(features)
    margin = estimator.decision_function(features)
    if margin.ndim == 1:
        positive = _sigmoid(margin)
        return np.stack([1 - positive, positive], axis=1)
    shifted = np.exp(margin - margin.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _sigmoid(margin: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-margin))


def score(task: Task, scoring: str, threshold: float, probs: np.ndarray, y: np.ndarray) -> float:
    """Macro one-vs-rest AUROC over the outputs that have both classes (as ich.evaluation.metrics), or accuracy."""
    if scoring == "acc":
        if task.metric_task == "multiclass":
            return float(np.mean(probs.argmax(axis=1) == y))
        return float(np.mean(called(probs, threshold) == y.reshape(len(y), -1)))
    truth = np.eye(task.num_outputs, dtype=np.int64)[y] if task.metric_task == "multiclass" else y.reshape(len(y), -1)
    aurocs = [roc_auc_score(t, p) for t, p in zip(truth.T, probs.T) if 0 < t.sum() < len(t)]
    return float(np.mean(aurocs)) if aurocs else math.nan


def _scorer(
    estimator: BaseEstimator, features: np.ndarray, y: np.ndarray, task: Task, scoring: str, threshold: float
) -> float:
    return score(task, scoring, threshold, probabilities(estimator, features, task), y)


def grouped_folds(split: Split, task: Task, n_splits: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cross-validation folds of whole patients, stratified on the class (on `any` for multilabel)."""
    patients = np.unique(split.patients).size
    if patients < n_splits:
        raise ValueError(
            f"classifier.search.cv={n_splits} needs at least {n_splits} training patients, the training split "
            f"has {patients}: lower classifier.search.cv or use more data."
        )
    y = sklearn_targets(split.targets, task)
    strata = y[:, 0] if y.ndim == 2 else y
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return list(folds.split(split.features, strata, split.patients))


def fit_search(classifier: DictConfig, task: Task, train: Split, val: Split, seed: int, threshold: float) -> Fitted:
    """Randomized search on grouped folds of `train`; the best `top_k` settings refit on all of `train`; `val` picks."""
    search = classifier.search
    if search.scoring not in SCORINGS:
        raise ValueError(f"Unknown classifier.search.scoring={search.scoring}: choose auroc or acc.")
    estimator, prefix = build_estimator(classifier, task)
    scorer = partial(_scorer, task=task, scoring=search.scoring, threshold=threshold)
    x, y = train.features, sklearn_targets(train.targets, task)
    searcher = RandomizedSearchCV(
        estimator,
        param_distributions(search.space, prefix),
        n_iter=int(search.n_iter),
        scoring=scorer,
        cv=grouped_folds(train, task, int(search.cv), seed),
        refit=False,
        n_jobs=search.n_jobs,
        random_state=seed,
        error_score=np.nan,
    )
    with warnings.catch_warnings():
        # a rare label absent from a fold is expected; one-vs-rest then predicts it constant
        warnings.filterwarnings("ignore", message="Label not .* is present in all training examples")
        searcher.fit(x, y)
        ranked = _ranked_settings(searcher.cv_results_, int(search.top_k))
        candidates, models = [], []
        for params in ranked:
            model = clone(estimator).set_params(**params["params"]).fit(x, y)
            val_score = scorer(model, val.features, sklearn_targets(val.targets, task)) if len(val) else math.nan
            plain = {name.removeprefix(prefix): _plain(value) for name, value in params["params"].items()}
            candidates.append({"params": plain, "cv_score": params["cv_score"], "val_score": val_score})
            models.append(model)
    # NaN (a class absent from validation) never wins; ties go to the better cross-validation rank
    best = max(range(len(models)), key=lambda k: (_or_worst(candidates[k]["val_score"]), -k))
    chosen = candidates[best]
    return Fitted(models[best], chosen["params"], chosen["cv_score"], chosen["val_score"], candidates)


def _ranked_settings(results: dict, top_k: int) -> list[dict]:
    """The `top_k` settings with the best mean cross-validation score, leaving out those that failed.

    When no setting has a score (too few patients for every fold to hold both classes), the first
    sampled settings go on, unranked, and validation alone chooses.
    """
    scores = results["mean_test_score"]
    order = [i for i in np.argsort(results["rank_test_score"], kind="stable") if not math.isnan(scores[i])]
    if not order:
        log.warning("Cross-validation scored no setting (a class absent from every fold?): validation alone chooses.")
        order = list(range(len(scores)))
    return [{"params": results["params"][i], "cv_score": float(scores[i])} for i in order[: max(1, top_k)]]


def _or_worst(value: float) -> float:
    return -math.inf if math.isnan(value) else value


def _plain(value: object) -> object:
    """A sampled value as JSON takes it (numpy scalars become Python numbers)."""
    return value.item() if isinstance(value, np.generic) else value
