"""`python -m ich.gpu_check`, prepared for a GPU the project has not had yet: what can go wrong on the rented
machine (a typo in an override, a part that fails or hangs, a card without a known peak) fails here instead."""

import inspect
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from conftest import compose_config
from ich import CONFIG_DIR
from ich.bench import parse_args as bench_args
from ich.gpu_check import (MIN_PART_S, TRAIN_BATCH, TRAIN_STEPS, Part, peak_tflops, plan, run_parts, succeeded, summary,
                           train_figures)

MACHINE = {"gpu": "NVIDIA H200", "gpus": 1, "gpu_memory_gib": 139.8, "driver": "570.86.15", "cuda": "12.8",
           "cudnn": 90800, "torch": "2.8.0", "python": "3.11.9", "cpu_cores": 16}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_without_a_gpu_it_stops_at_once_with_one_sentence_naming_ich_bench(tmp_path):
    ran = subprocess.run([sys.executable, "-m", "ich.gpu_check", "--out", str(tmp_path / "out")],
                         cwd=CONFIG_DIR.parent, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 2
    assert ran.stderr.strip().count("\n") == 0 and "needs a CUDA GPU" in ran.stderr
    assert "python -m ich.bench" in ran.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("card, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0),  # the SXM card, as torch.cuda.get_device_name reports it
    ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA H100 PCIe", 756.0),  # 1,513 TFLOP/s with sparsity on NVIDIA's datasheet, half that dense
    ("NVIDIA GeForce RTX 4090", None),
])
def test_the_peak_comes_from_the_name_torch_reports(card, peak):
    assert peak_tflops(card) == peak


def test_the_planned_commands_compose_with_the_real_config(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    parts = {part.name: part for part in plan(out, work, peak=989.0, gpus=2)}
    assert list(parts) == ["bench", "train_gpu", "train_ddp", "train_compile"] and parts["train_compile"].optional
    assert "train_compile" not in [part.name for part in plan(out, work, peak=989.0, gpus=2, compile_run=False)]

    bench = bench_args(parts["bench"].command[3:])  # after `python -m ich.bench`
    assert (bench.backbone, bench.size, bench.precision, bench.batch_size) == ("densenet121", 256, "bf16-mixed", 128)
    assert bench.peak_tflops == 989.0 and bench.compare_loader and not bench.vs_plain and bench.device == "cuda"
    assert bench.out == out / "bench.json"
    assert "--peak-tflops" not in plan(out, work, peak=None, gpus=1)[0].command

    trainer_arguments = set(inspect.signature(pl.Trainer).parameters)
    for name, strategy in [("train_gpu", None), ("train_ddp", "ddp"), ("train_compile", None)]:
        command = parts[name].command
        assert command[1] == "train.py" and (CONFIG_DIR.parent / "train.py").is_file()
        cfg = compose_config("train", command[2:])
        assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
        assert cfg.trainer.get("strategy") == strategy and cfg.model.compile == (name == "train_compile")
        assert set(cfg.trainer) - {"channels_last"} <= trainer_arguments  # a misspelt trainer key fails here
        assert cfg.trainer.max_steps == TRAIN_STEPS  # the steps its images/s are counted from
        assert cfg.callbacks.early_stopping is None and cfg.callbacks.progress_bar is None
        assert cfg.data.cache_dir == str(work / "cache")
        assert cfg.callbacks.model_checkpoint.dirpath == str(work / name / "checkpoints")


def running(pid: int) -> bool:
    """Whether the process is alive within a few seconds (a killed one may stay a zombie until reaped)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        stat = Path(f"/proc/{pid}/stat")
        if not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
        time.sleep(0.1)
    return True


def test_a_failing_or_hanging_part_loses_no_other_figures(tmp_path):
    python = [sys.executable, "-c"]
    parts = [
        Part("fails", [*python, "import sys; print('partial output'); sys.exit('CUDA error: out of memory')"], 60,
             lambda: {"never": "read"}),
        Part("works", [*python, "print('done')"], 60, lambda: {"images_per_s": 123.0}),
        Part("hangs", [*python, "import subprocess, time; print(subprocess.Popen(['sleep', '60']).pid, flush=True); "
                                "time.sleep(60)"], 2, lambda: {}),  # as a DDP rank or a DataLoader worker would
        Part("late", [*python, "print('never started')"], 60, lambda: {}, optional=True),
    ]
    # after the hanging part's 2 s, less than MIN_PART_S is left: the last part is skipped, not started
    record = run_parts(parts, tmp_path, budget_s=MIN_PART_S + 2, record={"machine": MACHINE})
    written = json.loads((tmp_path / "gpu_check.json").read_text())
    assert written == record and list(written["parts"]) == ["fails", "works", "hangs", "late"]
    fails, hangs, works, late = (written["parts"][name] for name in ("fails", "hangs", "works", "late"))
    assert (fails["status"], fails["returncode"], fails["figures"]) == ("failed", 1, None)
    assert fails["stderr_tail"] == ["CUDA error: out of memory"]
    assert (tmp_path / "fails.stdout.txt").read_text() == "partial output\n"
    assert (hangs["status"], hangs["returncode"]) == ("timed out", None)
    grandchild = int((tmp_path / "hangs.stdout.txt").read_text())
    assert not running(grandchild), "the timed-out part's own child process was left running"
    assert (works["status"], works["figures"]) == ("ok", {"images_per_s": 123.0})
    assert late["status"] == "skipped" and "--budget" in late["note"]
    assert not succeeded(written)


def test_the_summary_is_a_readme_table_and_says_what_failed():
    bench = {"backbone": "densenet121", "size": 256, "precision": "bf16-mixed", "batch_size": 128,
             "train_images_per_s": 2345.6, "infer_images_per_s": 7890.1, "train_tflops_per_s": 41.23,
             "infer_tflops_per_s": 29.87, "peak_tflops": 989.0, "train_peak_fraction": 0.0417,
             "infer_peak_fraction": 0.0302,
             "loader_vs_random": {"workers": 8, "real_images_per_s": 2100.0, "random_images_per_s": 2340.0,
                                  "ratio": 0.897}}
    train = {"backbone": "resnet18", "image_size": 256, "precision": "bf16-mixed", "batch_size": 32, "devices": 1,
             "steps": 200, "fit_seconds": 12.8, "fit_images_per_s": 500.0}
    record = {"machine": MACHINE, "peak_tflops": 989.0, "peak_note": None, "parts": {
        "bench": {"status": "ok", "optional": False, "figures": {"model": bench}},
        "train_gpu": {"status": "ok", "optional": False, "figures": train},
        "train_ddp": {"status": "failed", "optional": False, "returncode": 1, "seconds": 41.5,
                      "stderr": "train_ddp.stderr.txt", "figures": None,
                      "stderr_tail": ["Traceback (most recent call last):", "RuntimeError: NCCL error"]},
        "train_compile": {"status": "skipped", "optional": True, "figures": None, "note": "20 s of the budget left"},
    }}
    text = summary(record)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "NVIDIA H200 |" in line]
    assert "| figure | value | card |" in text and len(rows) == 6
    assert "| densenet121 256 px bf16-mixed batch 128: training images/s, random tensors on the GPU | 2,346 |" in text
    assert "training TFLOP/s | 41.2 (4.2% of 989) |" in text
    assert "(8 loader workers) vs random tensors, images/s | 2,100 vs 2,340 = 0.90 |" in text
    assert "`train.py trainer=gpu`: resnet18 256 px bf16-mixed, 200 steps of 32 on 1 GPU(s)" in text and "| 500 |" in text
    assert "train_ddp: failed, return code 1 after 41.5 s" in text and "    RuntimeError: NCCL error" in text
    assert "train_compile: skipped, 20 s of the budget left" in text
    assert "`train.py trainer=ddp`" not in text  # no figure of a failed part
    assert not succeeded(record)
    record["parts"]["train_ddp"] = {"status": "ok", "optional": False, "figures": {**train, "devices": 2}}
    assert succeeded(record)  # a skipped optional part is no failure
    assert "`train.py trainer=ddp`: resnet18 256 px bf16-mixed, 200 steps of 32 on 2 GPU(s)" in summary(record)
    for result in record["parts"].values():
        result.update(status="skipped", figures=None, note="0 s of the budget left")
    assert "No figures: every part failed or was skipped." in summary(record) and "| figure |" not in summary(record)


def test_training_images_per_second_come_from_the_run_folder_only_when_its_steps_are_known(tmp_path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text(
        "model:\n  backbone: resnet18\ndata:\n  image_size: 256\ntrainer:\n  precision: bf16-mixed\n")
    (tmp_path / "metrics.json").write_text(json.dumps({"time/fit_seconds": 16.0, "val/loss": 0.5}))
    log = tmp_path / "train.log"
    log.write_text(f"[INFO] - `Trainer.fit` stopped: `max_steps={TRAIN_STEPS}` reached.\n")
    figures = train_figures(tmp_path, devices=2)
    assert figures["steps"] == TRAIN_STEPS and figures["backbone"] == "resnet18" and figures["precision"] == "bf16-mixed"
    assert figures["fit_images_per_s"] == round(TRAIN_STEPS * TRAIN_BATCH * 2 / 16.0, 1)
    with log.open("a") as appended:  # a later run into the same folder that stopped for another reason
        appended.write("[INFO] - `Trainer.fit` stopped: `max_epochs=1000` reached.\n")
    with pytest.raises(ValueError, match="max_steps"):
        train_figures(tmp_path, devices=2)
