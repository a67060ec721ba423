"""Precision and layout follow the hardware; a GPU asked for where there is none is one sentence."""

import pytest
import torch

from conftest import FAST_RUN, compose_config
from ich.core.hardware import cpu_has_native_bf16, resolve_trainer


def cpuinfo(tmp_path, flags: str):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx2 {flags}\n\n")
    return path


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    assert cpu_has_native_bf16(cpuinfo(tmp_path, "avx512f avx512_bf16"))
    assert cpu_has_native_bf16(cpuinfo(tmp_path, "amx_tile amx_bf16"))
    assert not cpu_has_native_bf16(cpuinfo(tmp_path, "avx512f"))


@pytest.mark.parametrize("native, precision", [(True, "bf16-mixed"), (False, "32-true")])
def test_trainer_cpu_takes_bf16_only_where_the_cpu_has_native_bf16_and_channels_last_on_every_cpu(
        monkeypatch, native, precision):
    monkeypatch.setattr("ich.core.hardware.cpu_has_native_bf16", lambda: native)
    trainer = resolve_trainer(dict(compose_config("train", ["trainer=cpu"]).trainer))
    assert trainer["precision"] == precision and trainer["channels_last"] is True
    forced = resolve_trainer(dict(compose_config("train", ["trainer=cpu", "trainer.precision=32-true"]).trainer))
    assert forced["precision"] == "32-true"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
@pytest.mark.parametrize("recipe", [["trainer=gpu"], ["trainer=ddp"], ["experiment=rsna_strong"]])
def test_a_gpu_config_without_a_gpu_names_trainer_cpu(tmp_path, recipe):
    from ich.train import run

    cfg = compose_config("train", [*(o for o in FAST_RUN if o != "trainer=cpu"), f"output_dir={tmp_path}", *recipe])
    with pytest.raises(ValueError, match=r"^trainer.accelerator=gpu, but this machine has no usable CUDA GPU: train with trainer=cpu"):
        run(cfg)
