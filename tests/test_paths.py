"""Paths as hospitals name them: every entry point takes a path on its command line as written.

Export folders carry patient names and dates, whose characters are Hydra's override grammar. Each command runs
as a user types it (a subprocess, one argument per path) and prints its composed config (`--cfg job`), which
must hold the path exactly.
"""

import subprocess
import sys

import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser

from ich import CONFIG_DIR
from ich.cli import as_written

ROOT = CONFIG_DIR.parent
NAMES = ["DOE^JANE", "Doe, Jane (2023)", "O'Brien", "ct_[1]", "Smith = John [CT], O'Neil ^ (2)"]


def composed(*command: str) -> dict:
    """The job config that `python *command` composes, as Hydra prints it."""
    ran = subprocess.run([sys.executable, *command, "--cfg", "job"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert ran.returncode == 0, ran.stderr
    return yaml.safe_load(ran.stdout)


@pytest.mark.parametrize("name", NAMES)
def test_predict_takes_an_export_folder_named_like_a_patient_as_written(name, tmp_path):
    folder, run = tmp_path / name, tmp_path / name / "run 1"
    cfg = composed("predict.py", f"ckpt_path={run}", f"input={folder}")
    assert cfg["input"] == str(folder) and cfg["ckpt_path"] == str(run)


@pytest.mark.parametrize("command", [
    ["train.py", "data=images", "data.root={path}", "data.labels={path}/labels.csv", "model.weights={path}/w.pth",
     "model.init_from={path}/stage1.ckpt"],
    ["evaluate.py", "ckpt_path={path}", "study_images={path}", "study_labels={path}/reads.csv", "test_dir={path}"],
    ["extract.py", "data=rsna", "data.root={path}", "data.cache_dir={path}"],
    ["fit_classical.py", "data=nifti", "data.root={path}", "data.labels={path}/labels.csv"],
    ["-m", "ich.export", "ckpt_path={path}", "out={path}/model.onnx"],
    ["-m", "ich.prepare", "data=rsna", "data.root={path}", "data.split_file={path}/split.csv"],
], ids=lambda command: command[0] if command[0] != "-m" else command[1])
def test_every_entry_point_takes_every_path_option_as_written(command, tmp_path):
    path = str(tmp_path / NAMES[-1])
    cfg = composed(*[part.format(path=path) for part in command])
    for part in command:
        if "={path}" in part:
            key, value = part.split("=", 1)
            node = cfg
            for step in key.split("."):
                node = node[step]
            assert node == value.format(path=path), key


def test_any_other_option_hydra_cannot_read_says_how_to_quote_it_and_the_advice_works():
    ran = subprocess.run([sys.executable, "train.py", "model.backbone=res^net"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert ran.returncode != 0 and "Traceback" not in ran.stderr
    (sentence,) = [line for line in ran.stderr.splitlines() if line.startswith("Error:")]
    assert sentence == ("Error: Hydra cannot read model.backbone=res^net: quote its value, as "
                        "model.backbone=\"'res^net'\" in a shell, to take it as written.")
    # what the sentence advises, as a shell passes it on
    assert composed("train.py", "model.backbone='res^net'")["model"]["backbone"] == "res^net"


def test_sweeps_nulls_and_quoted_values_keep_their_meaning():
    parser = OverridesParser.create()
    assert as_written("seed=1,2", parser) == "seed=1,2"  # a multirun sweep of a value, not a path
    assert as_written("out=null", parser) == "out=null"
    assert as_written("input='/x/DOE^JANE'", parser) == "input='/x/DOE^JANE'"  # quoted by the user: left alone
    quoted = as_written("input=/x/DOE^JANE", parser)
    assert as_written(quoted, parser) == quoted  # DDP re-runs the rewritten command line: no second quoting
