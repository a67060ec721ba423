"""logger=wandb, offline: what a W&B run records, that no patient identifier reaches it, and resuming it."""

import os
import struct
from pathlib import Path

import pydicom
import pytest
import torch
from wandb.proto import wandb_internal_pb2

from conftest import FAST_RUN, compose_config
from ich.data.datamodule import phantom_root
from ich.train import run
from ich.training.callbacks import WANDB_RUN_ID_KEY

# Its module fixtures train or write the data once; under pytest-xdist (`--dist loadgroup`) the module
# stays on one worker so that they are not built again on another.

# The .wandb file is a LevelDB-style log: a 7-byte file header, then 32 KiB blocks of records, each with a
# 7-byte header (crc32, length, type); a record too long for its block continues in the next (types 2-4).
WANDB_HEADER, BLOCK, FRAGMENT_HEADER = 7, 32768, 7
FULL, LAST = 1, 4


def wandb_records(run_dir: Path) -> list[wandb_internal_pb2.Record]:
    """Every record of an offline run folder (wandb/offline-run-*), as W&B would upload it with `wandb sync`."""
    raw = next(run_dir.glob("*.wandb")).read_bytes()
    records, pending, pos = [], b"", WANDB_HEADER
    while pos + FRAGMENT_HEADER <= len(raw):
        if BLOCK - pos % BLOCK < FRAGMENT_HEADER:  # block trailer: padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + FRAGMENT_HEADER])
        pending += raw[pos + FRAGMENT_HEADER:pos + FRAGMENT_HEADER + length]
        pos += FRAGMENT_HEADER + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def of_type(records, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def history_keys(records) -> set[str]:
    return {item.key or "/".join(item.nested_key) for h in of_type(records, "history") for item in h.item}


def offline_runs(output_dir: Path) -> list[Path]:
    return sorted((output_dir / "wandb").glob("offline-run-*"))


@pytest.fixture(scope="module")
def wandb_run(cache_dir, tmp_path_factory):
    """One multilabel run with logger=wandb and no API key anywhere; returns its output folder."""
    output_dir = tmp_path_factory.mktemp("wandb-run")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("WANDB_MODE", raising=False)
        patch.delenv("WANDB_API_KEY", raising=False)
        patch.setenv("HOME", str(output_dir / "home"))  # no ~/.netrc with a W&B key either
        cfg = compose_config("train", [*FAST_RUN, f"output_dir={output_dir}", "logger=wandb", "task=multilabel",
                                       "trainer.log_every_n_steps=1"])
        run(cfg)
        assert os.environ["WANDB_MODE"] == "offline"
    return output_dir


def test_wandb_logs_offline_when_no_api_key_is_set(wandb_run):
    runs = offline_runs(wandb_run)
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))
    assert (wandb_run / "metrics.json").is_file()


def test_wandb_run_holds_config_metrics_lr_and_figures(wandb_run):
    records = wandb_records(offline_runs(wandb_run)[0])
    config_keys = {item.key for c in of_type(records, "config") for item in c.update}
    assert {"data", "model", "trainer", "optimizer", "seed", "optimized_metric"} <= config_keys  # the Hydra config
    keys = history_keys(records)
    assert {"train/loss", "val/auroc", "val/loss", "test/auroc", "lr-AdamW", "trainer/global_step"} <= keys
    for image in ("val/confusion_matrix", "val/roc", "val/slices", "test/confusion_matrix", "test/roc"):
        assert f"{image}/filenames" in keys, image
    media = {path.parent.name + "/" + path.name.split("_")[0] for path in offline_runs(wandb_run)[0].rglob("*.png")}
    assert {"val/slices", "val/roc", "test/roc"} <= media


def phantom_identifiers(phantom: Path) -> set[str]:
    """The raw PatientID, PatientName and study/series UIDs written into the phantom's DICOM headers."""
    found = set()
    for path in phantom.rglob("*.dcm"):
        header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "SeriesInstanceUID"):
            value = str(header.get(keyword) or "")
            found |= {part for part in (value, *value.split("^")) if len(part) >= 5}
    return found


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # RSNA-style ids in UID tags, as the phantom writes
def test_no_patient_identifier_reaches_anything_logged(wandb_run, cache_dir):
    # this run's own phantom only: other tests' phantoms in the shared cache draw ids from the same seeds
    settings = compose_config("train", [*FAST_RUN, "output_dir=unused"]).data.phantom
    identifiers = phantom_identifiers(phantom_root(cache_dir, dict(settings)))
    assert len(identifiers) >= 30  # 10 patients: ids, names, study and series UIDs
    files = [path for path in wandb_run.rglob("*") if path.is_file()]
    assert any(path.suffix == ".wandb" for path in files)
    for path in files:
        content = path.read_bytes()
        leaked = sorted(i for i in identifiers if i.encode() in content)
        assert not leaked, f"{path.relative_to(wandb_run)} holds {leaked[:5]}"


def test_resuming_from_a_checkpoint_continues_the_same_wandb_run(wandb_run, tmp_path):
    checkpoint = wandb_run / "checkpoints" / "last.ckpt"
    first_id = torch.load(checkpoint, map_location="cpu", weights_only=True)[WANDB_RUN_ID_KEY]
    assert offline_runs(wandb_run)[0].name.endswith(first_id)
    cfg = compose_config("train", [*FAST_RUN, f"output_dir={tmp_path}", "logger=wandb", "task=multilabel",
                                   "trainer.max_epochs=2", f"ckpt_path={checkpoint}", "test=false"])
    run(cfg)
    # the resumed run continues in the checkpoint's own run folder, as the same W&B run
    runs = offline_runs(wandb_run)
    assert len(runs) == 2 and all(r.name.endswith(first_id) for r in runs)
    (run_record,) = of_type(wandb_records(runs[-1]), "run")
    assert run_record.run_id == first_id
