"""No patient identity leaves the data cache: every file a run writes is searched for the DICOMs' identifiers."""

import hashlib
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pydicom
import pytest
import torch
from omegaconf import OmegaConf
from pydicom import config

from conftest import FAST_RUN, compose_config
from ich import CONFIG_DIR
from ich.data.datamodule import phantom_root
from ich.data.phantom import generate
from ich.evaluate import run as evaluate
from ich.train import run as train

ROOT = CONFIG_DIR.parent

IDENTIFYING = ("PatientID", "PatientName", "PatientBirthDate", "StudyInstanceUID", "SeriesInstanceUID")


def identifiers(dicom_dir: Path) -> set[str]:
    found = set()
    for path in dicom_dir.glob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        found |= {str(ds.get(tag, "")) for tag in IDENTIFYING}
    return {value for value in found if len(value) >= 6}


def test_nothing_a_run_writes_names_a_patient(cache_dir, tmp_path, capfd):
    cfg = compose_config("train", [*FAST_RUN, f"output_dir={tmp_path / 'run'}", "task=multilabel"])
    train(cfg)
    (tmp_path / "run" / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / "run" / ".hydra" / "config.yaml", resolve=True)  # as Hydra's own runs do
    checkpoint = next((tmp_path / "run" / "checkpoints").glob("epoch*.ckpt"))
    evaluate(compose_config("evaluate", [f"ckpt_path={checkpoint}", f"output_dir={tmp_path / 'eval'}"]), overrides=[])
    console = capfd.readouterr()

    secrets = identifiers(phantom_root(cache_dir, dict(cfg.data.phantom)) / "stage_2_train")
    assert len(secrets) > 10, "the phantom should carry patient names, ids and UIDs to look for"
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "predictions.csv" for p in written) and any(p.suffix == ".ckpt" for p in written)
    for path in written:
        data = path.read_bytes()
        if path.suffix == ".ckpt":  # a zip archive: search what it holds, not its compressed bytes
            data += repr(torch.load(path, map_location="cpu", weights_only=True).get("hyper_parameters")).encode()
        leaked = [s for s in secrets if s.encode() in data]
        assert not leaked, f"{path.relative_to(tmp_path)} contains {leaked}"
    leaked = [s for s in secrets if s in console.out or s in console.err]
    assert not leaked, f"the console shows {leaked}"


@pytest.mark.parametrize("value", ["ID_8f3a2b", "1.2.840.113619.2.55.3"])
def test_pseudonyms_are_stable_and_do_not_contain_the_value(value):
    from ich.core.privacy import pseudonym

    assert pseudonym(value) == pseudonym(value) != pseudonym(value + "x")
    assert value not in pseudonym(value)


# --- predict.py on a folder named like a patient, as a user runs it --------------------------------------------

PATIENT_ID = "40817263"  # a medical record number: 8 digits, recovered in minutes from a known salt
PATIENT_NAME = "DOE^JANE"
OLD_DEFAULT_SALT = "ich-default-salt"


def guessable_salts(*folders: Path) -> set[str]:
    """Every line and every word of the repository's tracked files and of `folders`' files: the salts an attacker
    holding the code and the outputs would try first."""
    files = [ROOT / name for name in subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                                                    check=True).stdout.splitlines()]
    files += [path for folder in folders for path in folder.rglob("*")]
    found = {"", OLD_DEFAULT_SALT}
    for path in files:
        if path.is_file():
            text = path.read_bytes().decode("utf-8", errors="ignore")
            lines = [line.strip() for line in text.splitlines()]
            found.update(lines)
            found.update(word for line in lines for word in re.split(r"[\s'\"`,;:=()\[\]{}<>]+", line))
    return found


@pytest.fixture(scope="module")
def predicted(cache_dir, tmp_path_factory):
    """predict.py's results folder for an export folder named after its patient, with the salt file it made."""
    tmp = tmp_path_factory.mktemp("predict")
    train(compose_config("train", [*FAST_RUN, f"output_dir={tmp / 'run'}", "test=false"]))
    summary = generate(tmp / "phantom", patients=1, slices=6, size=64, seed=3, quirks=False)
    export = tmp / "exports" / PATIENT_NAME / "2026-12-01"
    export.mkdir(parents=True)
    for k, image_id in enumerate(next(iter(summary["series"].values()))):
        ds = pydicom.dcmread(tmp / "phantom" / "stage_2_train" / f"{image_id}.dcm")
        ds.PatientID, ds.PatientName = PATIENT_ID, PATIENT_NAME
        with config.disable_value_validation():  # the phantom's RSNA-style `ID_...` UIDs are invalid on purpose
            ds.save_as(export / f"IM{k:04d}")
    env = {key: value for key, value in os.environ.items() if key != "ICH_ID_SALT"}
    env["XDG_CONFIG_HOME"] = str(tmp / "config")  # a fresh installation: no salt yet
    ran = subprocess.run([sys.executable, "predict.py", f"ckpt_path={tmp / 'run'}", f"input={export.parent}",
                          f"hydra.run.dir={tmp / 'results'}", "min_slices=4", "heatmaps=1"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr
    return tmp / "results", export.parent, env


@pytest.mark.slow
def test_no_file_in_predicts_results_folder_holds_the_input_path_or_the_patients_name(predicted):
    results, export, _ = predicted
    written = [path for path in results.rglob("*") if path.is_file()]
    assert {"studies.csv", "report.html"} <= {path.name for path in written}
    for path in written:
        data = path.read_bytes()
        leaked = [value for value in (PATIENT_NAME, PATIENT_ID, str(export)) if value.encode() in data]
        assert not leaked, f"{path.relative_to(results)} holds {leaked}"


@pytest.mark.slow
def test_the_default_pseudonym_cannot_be_recomputed_from_the_code_or_the_outputs(predicted):
    results, _, env = predicted
    (patient,) = pd.read_csv(results / "studies.csv")["patient"].unique()
    recomputed = [salt for salt in guessable_salts(results)
                  if "P" + hashlib.sha256(f"{salt}:{PATIENT_ID}".encode()).hexdigest()[:12] == patient]
    assert not recomputed, f"the pseudonym is reproduced with the salt {recomputed}"

    salt_file = Path(env["XDG_CONFIG_HOME"]) / "ich" / "id_salt"
    assert stat.S_IMODE(salt_file.stat().st_mode) == 0o600
    command = f"from ich.core.privacy import pseudonym; print(pseudonym('{PATIENT_ID}'))"
    again = subprocess.run([sys.executable, "-c", command], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=60, check=True)
    assert again.stdout.strip() == patient  # another process of the same installation agrees


def test_processes_starting_together_agree_on_one_new_salt(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "ICH_ID_SALT"}
    env["XDG_CONFIG_HOME"] = str(tmp_path)
    command = [sys.executable, "-c", "from ich.core.privacy import pseudonym; print(pseudonym('40817263'))"]
    started = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True) for _ in range(4)]
    answers = {process.communicate(timeout=60)[0].strip() for process in started}
    salt_file = tmp_path / "ich" / "id_salt"
    assert len(answers) == 1 and stat.S_IMODE(salt_file.stat().st_mode) == 0o600
    assert len(salt_file.read_text().strip()) == 64  # 256 random bits, as hex
