"""What the machine runs fastest: bf16 and channels-last where the hardware computes bf16 natively, float32
elsewhere; and one sentence, not a Lightning traceback, when a GPU is asked for on a machine without one."""

import platform
from pathlib import Path

import torch

AUTO = "auto"
# CPU flags of native bf16 arithmetic (x86: AVX-512 BF16 since Cooper Lake and Zen 4, AMX since Sapphire Rapids).
BF16_CPU_FLAGS = {"avx512_bf16", "amx_bf16"}
GPU_ACCELERATORS = ("gpu", "cuda")


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU computes bf16 natively (Linux x86 reports it in /proc/cpuinfo; elsewhere: no)."""
    if platform.system() != "Linux" or not cpuinfo.is_file():
        return False
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("flags")), [])
    return bool(BF16_CPU_FLAGS & set(flags))


def resolve_trainer(trainer: dict) -> dict:
    """The trainer config with `precision: auto` and `channels_last: auto` decided for this machine.

    auto means bf16-mixed on a GPU that supports bf16 or on a CPU with native bf16, 32-true elsewhere; and
    channels-last on every CPU (oneDNN's convolutions were never slower with it, in float32 too: docs/explanation/speed.md, "Training
    speed settings") and on a GPU with bf16. Metrics are computed in float32 either way (the head and the
    probabilities are float32: see ICHLitModule.forward).
    """
    accelerator = str(trainer.get("accelerator", AUTO))
    gpu = torch.cuda.is_available() and accelerator in (AUTO, *GPU_ACCELERATORS)
    if accelerator in GPU_ACCELERATORS and not torch.cuda.is_available():
        raise ValueError("trainer.accelerator=gpu, but this machine has no usable CUDA GPU: train with trainer=cpu "
                         "(or trainer=default, which takes a GPU when there is one).")
    fast = torch.cuda.is_bf16_supported() if gpu else cpu_has_native_bf16()
    resolved = dict(trainer)
    if resolved.get("precision") == AUTO:
        resolved["precision"] = "bf16-mixed" if fast else "32-true"
    if resolved.get("channels_last") == AUTO:
        on_cpu = accelerator == "cpu" or (accelerator == AUTO and not gpu and not torch.backends.mps.is_available())
        resolved["channels_last"] = fast or on_cpu
    return resolved
