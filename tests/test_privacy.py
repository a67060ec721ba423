"""No patient identity leaves the data cache: every file a run writes is searched for the DICOMs' identifiers."""

from pathlib import Path

import pydicom
import pytest
import torch
from omegaconf import OmegaConf

from conftest import FAST_RUN, compose_config
from ich.data.datamodule import phantom_root
from ich.evaluate import run as evaluate
from ich.train import run as train

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
    from ich.privacy import pseudonym

    assert pseudonym(value) == pseudonym(value) != pseudonym(value + "x")
    assert value not in pseudonym(value)
