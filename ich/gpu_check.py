"""`python -m ich.gpu_check --out gpu_check`: every GPU figure the speed page (docs/explanation/speed.md) lacks, in one command of a few minutes.

No GPU had been lent to the project when this was written, so it was prepared to be run once, the first time one
is: the GPU benchmark (densenet121 at 256 px in bf16, random tensors against real cached batches, TFLOP/s against
the card's peak) and a few training steps of `train.py` with trainer=gpu, trainer=ddp and model.compile=true.
Each part is its own process with its own timeout and log files, and gpu_check.json is rewritten after every
part, so a part that fails or runs out of time loses no other part's figures. At the end it prints a Markdown
table to paste into docs/explanation/speed.md, and a few lines per failed part.
"""

import argparse
import contextlib
import functools
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ich import CONFIG_DIR
from ich.core.results import write_atomic

ROOT = CONFIG_DIR.parent  # where train.py is
NO_GPU = ("python -m ich.gpu_check needs a CUDA GPU and this machine has none: for the CPU figures run "
          "python -m ich.bench.")
# Dense bf16 tensor-core TFLOP/s from NVIDIA's datasheets (half their "with sparsity" figures), by a part of the
# name torch.cuda.get_device_name reports; the first match wins, so the PCIe and NVL cards come before the SXM.
PEAK_TFLOPS = (("H200 NVL", 835.0), ("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0),
               ("A100", 312.0))
# 2,048 slices are 16 batches of 128 per pass, two per loader worker: the start of each pass, when the workers
# begin anew, then costs little of the timed steps. One repeat: the per-core figures are a by-product here.
BENCH_ARGS = ["--device", "cuda", "--backbone", "densenet121", "--size", "256", "--precision", "bf16-mixed",
              "--batch-size", "128", "--steps", "100", "--warmup", "10", "--slices", "2048", "--repeats", "1",
              "--compare-loader", "--no-vs-plain"]
# Training runs: the default model and phantom, a fixed number of steps of full batches (training drops the last,
# partial batch of an epoch); about ten epochs of the phantom's training split.
TRAIN_BATCH, TRAIN_STEPS = 32, 200
TRAIN_RUNS = {  # part name -> the overrides that make it what it is
    "train_gpu": ["trainer=gpu"],
    "train_ddp": ["trainer=ddp"],
    "train_compile": ["trainer=gpu", "model.compile=true"],
}
TIMEOUT_S = {"bench": 240, "train_gpu": 180, "train_ddp": 180, "train_compile": 240}
MIN_PART_S = 60  # a part is not started with less of the budget left
STDERR_LINES = 15


@dataclass
class Part:
    """One command of the check, how long it may run, and how to read its figures once it ended well."""

    name: str
    command: list[str]
    timeout_s: float
    figures: Callable[[], dict]
    optional: bool = False


def peak_tflops(card: str) -> float | None:
    """The card's dense bf16 peak, or None for a card not in PEAK_TFLOPS."""
    return next((peak for part, peak in PEAK_TFLOPS if part.lower() in card.lower()), None)


def describe_machine() -> dict:
    """The card, how many, their memory, the software under them and the CPU cores the loaders share."""
    driver = None
    if shutil.which("nvidia-smi"):
        query = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=60)
        driver = query.stdout.split()[0] if query.returncode == 0 and query.stdout.strip() else None
    return {
        "gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
        "driver": driver, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "torch": torch.__version__, "python": platform.python_version(), "cpu_cores": len(os.sched_getaffinity(0)),
    }


def train_overrides(name: str, out: Path, work: Path) -> list[str]:
    """The command line of one training run: its own run folder under `out`; phantom, slice cache and checkpoints
    (hundreds of MB) under `work`; no early stop, so every run takes the same steps."""
    return [
        *TRAIN_RUNS[name],
        f"hydra.run.dir={out / name}",
        f"data.cache_dir={work / 'cache'}",
        f"callbacks.model_checkpoint.dirpath={work / name / 'checkpoints'}",
        f"data.batch_size={TRAIN_BATCH}",
        f"+trainer.max_steps={TRAIN_STEPS}",
        "trainer.max_epochs=1000",  # max_steps ends the run
        "+trainer.limit_val_batches=2",
        "trainer.num_sanity_val_steps=0",
        "callbacks.early_stopping=null",
        "callbacks.progress_bar=null",
        "bootstrap=200",
    ]


def bench_figures(path: Path) -> dict:
    written = json.loads(path.read_text())
    return {"model": written["model"], "per_core": written["per_core"], "cache_build": written["cache_build"]}


def train_figures(run_dir: Path, devices: int) -> dict:
    """Training images/s over the whole fit: time/fit_seconds of metrics.json, so cuDNN autotuning, validation,
    checkpoint writes and any compilation are in it. The steps are TRAIN_STEPS when train.log says that is why
    fit stopped (Lightning logs it; the log of an earlier run in the same folder comes before, hence the last such
    line); under DDP each of the `devices` processes takes them."""
    log = run_dir / "train.log"
    stops = [line for line in log.read_text().splitlines() if "`Trainer.fit` stopped:" in line]
    if not stops or f"`max_steps={TRAIN_STEPS}` reached" not in stops[-1]:
        raise ValueError(f"{log} does not say fit stopped at max_steps={TRAIN_STEPS}, so its steps are unknown")
    fit_seconds = json.loads((run_dir / "metrics.json").read_text())["time/fit_seconds"]
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    return {
        "backbone": cfg.model.backbone, "image_size": cfg.data.image_size, "precision": cfg.trainer.precision,
        "batch_size": TRAIN_BATCH, "devices": devices, "steps": TRAIN_STEPS, "fit_seconds": round(fit_seconds, 2),
        "fit_images_per_s": round(TRAIN_STEPS * TRAIN_BATCH * devices / fit_seconds, 1),
    }


def plan(out: Path, work: Path, peak: float | None, gpus: int, compile_run: bool = True) -> list[Part]:
    """The parts in order of importance: the figures issue 15 asks for first, the optional compiled run last."""
    bench = [sys.executable, "-m", "ich.bench", *BENCH_ARGS, "--out", str(out / "bench.json")]
    if peak:
        bench += ["--peak-tflops", f"{peak:g}"]
    parts = [Part("bench", bench, TIMEOUT_S["bench"], lambda: bench_figures(out / "bench.json"))]
    for name in TRAIN_RUNS:
        if name == "train_compile" and not compile_run:
            continue
        devices = gpus if name == "train_ddp" else 1
        figures = functools.partial(train_figures, out / name, devices)
        command = [sys.executable, "train.py", *train_overrides(name, out, work)]
        parts.append(Part(name, command, TIMEOUT_S[name], figures, optional=name == "train_compile"))
    return parts


def run_part(part: Part, out: Path, timeout_s: float) -> dict:
    """Run one part in its own process group with its output in `out`; on timeout the whole group is killed
    (DataLoader workers and DDP ranks included)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for name, value in (("NO_ALBUMENTATIONS_UPDATE", "1"), ("HF_HUB_OFFLINE", "1"), ("WANDB_MODE", "offline")):
        env.setdefault(name, value)
    stdout, stderr = out / f"{part.name}.stdout.txt", out / f"{part.name}.stderr.txt"
    print(f"[{part.name}] {shlex.join(part.command)}  (at most {timeout_s:.0f} s)", flush=True)
    started = time.perf_counter()
    with stdout.open("w") as out_file, stderr.open("w") as err_file:
        process = subprocess.Popen(part.command, cwd=ROOT, env=env, stdout=out_file, stderr=err_file,
                                   start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            if process.poll() is None:  # timed out, or this process was interrupted
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    result = {
        "command": shlex.join(part.command), "returncode": returncode,
        "seconds": round(time.perf_counter() - started, 1), "stdout": stdout.name, "stderr": stderr.name,
        "status": "ok" if returncode == 0 else "timed out" if returncode is None else "failed", "figures": None,
    }
    if returncode == 0:
        try:
            result["figures"] = part.figures()
        except (OSError, KeyError, ValueError) as err:  # ended well but wrote no figures: a failure of its own
            result.update(status="failed", note=f"no figures: {type(err).__name__}: {err}")
    if result["status"] != "ok":
        result["stderr_tail"] = stderr.read_text(errors="replace").splitlines()[-STDERR_LINES:]
    print(f"[{part.name}] {result['status']} after {result['seconds']} s", flush=True)
    return result


def run_parts(parts: Sequence[Part], out: Path, budget_s: float, record: dict) -> dict:
    """Run the parts in order within `budget_s` seconds in all, writing `record` with every result so far to
    out/gpu_check.json after each one."""
    record["parts"] = {}
    deadline = time.perf_counter() + budget_s
    for part in parts:
        left = deadline - time.perf_counter()
        if left < MIN_PART_S:
            result = {"command": shlex.join(part.command), "status": "skipped", "figures": None,
                      "note": f"{left:.0f} s of the {budget_s:.0f} s budget left (a part needs {MIN_PART_S}): "
                              f"rerun with a larger --budget"}
        else:
            result = run_part(part, out, min(part.timeout_s, left))
        result["optional"] = part.optional
        record["parts"][part.name] = result
        write_atomic(out / "gpu_check.json", lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))
    return record


def table_rows(parts: dict) -> list[tuple[str, str]]:
    """(figure, value) for every figure the parts that ended well produced."""
    rows = []
    bench = (parts.get("bench") or {}).get("figures")
    if bench:
        model = bench["model"]
        setting = f"{model['backbone']} {model['size']} px {model['precision']} batch {model['batch_size']}"
        peak = model.get("peak_tflops")
        rows += [
            (f"{setting}: training images/s, random tensors on the GPU", f"{model['train_images_per_s']:,.0f}"),
            (f"{setting}: inference images/s", f"{model['infer_images_per_s']:,.0f}"),
        ]
        for stage in ("train", "infer"):
            share = f" ({model[f'{stage}_peak_fraction']:.1%} of {peak:g})" if peak else " (no peak known for this card)"
            rows.append((f"{setting}: {'training' if stage == 'train' else 'inference'} TFLOP/s",
                         f"{model[f'{stage}_tflops_per_s']:.1f}{share}"))
        compared = model.get("loader_vs_random")
        if compared:
            rows.append((f"{setting}: training on cached, augmented batches ({compared['workers']} loader workers) "
                         f"vs random tensors, images/s",
                         f"{compared['real_images_per_s']:,.0f} vs {compared['random_images_per_s']:,.0f} "
                         f"= {compared['ratio']:.2f}"))
    for name, overrides in TRAIN_RUNS.items():
        figures = (parts.get(name) or {}).get("figures")
        if figures:
            included = "validation, checkpoints" + (", compilation" if "model.compile=true" in overrides else "")
            rows.append((f"`train.py {' '.join(overrides)}`: {figures['backbone']} {figures['image_size']} px "
                         f"{figures['precision']}, {figures['steps']} steps of {figures['batch_size']} on "
                         f"{figures['devices']} GPU(s), images/s over the whole fit ({included})",
                         f"{figures['fit_images_per_s']:,.0f}"))
    return rows


def summary(record: dict) -> str:
    """The Markdown table for the speed page, then one paragraph per part that did not end well."""
    machine = record["machine"]
    lines = [f"Machine: {machine['gpus']} x {machine['gpu']} ({machine['gpu_memory_gib']} GiB), driver "
             f"{machine['driver']}, CUDA {machine['cuda']}, torch {machine['torch']}, {machine['cpu_cores']} CPU cores.",
             ""]
    rows = table_rows(record["parts"])
    if rows:
        lines += ["| figure | value | card |", "| --- | ---: | --- |"]
        lines += [f"| {figure} | {value} | {machine['gpu']} |" for figure, value in rows]
    else:
        lines.append("No figures: every part failed or was skipped.")
    if record.get("peak_note"):
        lines += ["", record["peak_note"]]
    for name, result in record["parts"].items():
        if result["status"] == "ok":
            continue
        if result["status"] == "skipped":
            lines += ["", f"{name}: skipped, {result['note']}"]
            continue
        ended = "timed out" if result["returncode"] is None else f"failed, return code {result['returncode']}"
        lines += ["", f"{name}: {ended} after {result['seconds']} s{'; ' + result['note'] if 'note' in result else ''}"
                      f"; last lines of {result['stderr']}:"]
        lines += [f"    {line}" for line in result["stderr_tail"]]
    return "\n".join(lines)


def succeeded(record: dict) -> bool:
    """Whether every part that is not optional ended well."""
    return all(result["status"] == "ok" for result in record["parts"].values() if not result["optional"])


@contextlib.contextmanager
def work_dir(path: Path | None) -> Iterator[Path]:
    """`path`, kept; or a temporary folder, removed at the end."""
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path.resolve()
        return
    with tempfile.TemporaryDirectory(prefix="ich-gpu-check-") as tmp:
        yield Path(tmp)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ich.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check"),
                        help="folder of gpu_check.json, bench.json, table.md, the training runs and every part's logs")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the card's dense bf16 peak (default: from the card's name, for H100, H200 and A100)")
    parser.add_argument("--budget", type=float, default=450, help="seconds for all parts together")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="last and optional: a training run with model.compile=true, if the budget allows")
    parser.add_argument("--work", type=Path, default=None,
                        help="phantom, slice cache and checkpoints (default: a temporary folder, removed at the end)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        return 2
    machine = describe_machine()
    peak = args.peak_tflops or peak_tflops(machine["gpu"])
    record = {"machine": machine, "peak_tflops": peak,
              "peak_note": None if peak else f"No peak known for {machine['gpu']}: TFLOP/s without a fraction of "
                                             f"the peak; rerun with --peak-tflops (dense bf16) for one."}
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    with work_dir(args.work) as work:
        run_parts(plan(out, work, peak, machine["gpus"], args.compile), out, args.budget, record)
    text = summary(record)
    (out / "table.md").write_text(text + "\n")
    print(f"\n{text}\n\nwritten to {out / 'gpu_check.json'} and {out / 'table.md'}")
    return 0 if succeeded(record) else 1


if __name__ == "__main__":
    sys.exit(main())
