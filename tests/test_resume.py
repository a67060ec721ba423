"""Interrupted and repeated runs: a killed run resumes where it stopped; a seeded run repeats exactly."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import FAST_RUN, compose_config
from ich import CONFIG_DIR
from ich.train import run

ROOT = CONFIG_DIR.parent
# Long enough to be killed in the middle; small enough for seconds per epoch on 2 cores.
RESUMABLE = [*FAST_RUN, "trainer.max_epochs=4", "callbacks.early_stopping=null", "task=multilabel"]


def comparable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith("time/")}


def test_a_seeded_run_repeats_exactly(cache_dir, tmp_path):
    """Augmentation included: albumentations keeps its own random state, which seed_everything does not reach."""
    first = run(compose_config("train", [*FAST_RUN, "trainer.max_epochs=2", f"output_dir={tmp_path / 'a'}"]))
    second = run(compose_config("train", [*FAST_RUN, "trainer.max_epochs=2", f"output_dir={tmp_path / 'b'}"]))
    assert comparable(first) == comparable(second)


def train_cli(out, *extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "train.py", *RESUMABLE, f"hydra.run.dir={out}", *extra],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


@pytest.mark.slow
def test_a_killed_run_resumes_and_ends_where_an_uninterrupted_one_does(cache_dir, tmp_path):
    whole = tmp_path / "whole"
    assert train_cli(whole).wait(timeout=600) == 0
    killed = tmp_path / "killed"
    process = train_cli(killed)
    last = killed / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # somewhere after the first epoch's checkpoint
    process.wait()
    assert not (killed / "metrics.json").exists(), "the run must have been killed before it finished"
    assert not list((killed / "checkpoints").glob("*.tmp*")), "no half-written checkpoint is left behind"

    resumed = train_cli(tmp_path / "resume-log", f"ckpt_path={killed}")
    _, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr
    # the resumed run continues in the killed run's folder, from its last epoch
    result = json.loads((killed / "metrics.json").read_text())
    expected = json.loads((whole / "metrics.json").read_text())
    assert comparable(result) == pytest.approx(comparable(expected), abs=1e-6)


def test_resume_without_a_checkpoint_is_one_sentence(tmp_path):
    from ich.core.runs import resume_checkpoint

    with pytest.raises(FileNotFoundError, match="ckpt_path=last found no checkpoints/last.ckpt"):
        resume_checkpoint("last", tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a checkpoint"):
        resume_checkpoint(str(tmp_path / "nope.ckpt"), tmp_path)
