"""Fitted classifiers on disk: skops files, which load without unpickling arbitrary code, plus a JSON of provenance.

A classifier is only usable on features made the same way, so the JSON beside it records the feature
extractor, the data preprocessing and the classes; `load_classifier` returns both.
"""

import json
from pathlib import Path

import skops.io as sio
from sklearn.base import BaseEstimator

from ich.core.results import write_json

# Packages whose types a classifier file may contain; skops refuses any other type unless trusted here.
TRUSTED_PACKAGES = ("sklearn", "numpy", "scipy")


def save_classifier(path: Path, estimator: BaseEstimator, info: dict) -> None:
    """Write `path` (.skops) and `path` with .json: what the classifier is and which features it expects."""
    sio.dump(estimator, path)
    write_json(path.with_suffix(".json"), info)


def load_classifier(path: str | Path) -> tuple[BaseEstimator, dict]:
    """The classifier of a .skops file and its provenance; refuses files holding types outside TRUSTED_PACKAGES."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass a classifier.skops written by fit_classical.py.")
    untrusted = sio.get_untrusted_types(file=path)
    foreign = [name for name in untrusted if name.split(".", 1)[0] not in TRUSTED_PACKAGES]
    if foreign:
        raise ValueError(
            f"{path} holds types outside {', '.join(TRUSTED_PACKAGES)} ({', '.join(foreign)}): not loading it; "
            "only load classifier files from a source you trust, with skops.io.load(path, trusted=[...])."
        )
    estimator = sio.load(path, trusted=untrusted)
    info_path = path.with_suffix(".json")
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    return estimator, info
