"""Backbones, weights files, the hub fallback, the head, and the model/optimizer/scheduler configs."""

import inspect
import socket

import huggingface_hub
import pytest
import safetensors.torch
import timm
import torch
from torch import nn

from conftest import compose_config
from ich import CONFIG_DIR
from ich.models import build_head, create_backbone
from ich.models.simple import SIMPLE_MODELS
from ich.training.module import ICHLitModule

TINY = "test_resnet"


def tiny_weights_file(tmp_path, name=TINY, suffix=".safetensors"):
    """An ImageNet-style weights file (classifier included) of a 3-channel model, as timm's hub serves them."""
    model = timm.create_model(name)
    path = tmp_path / f"{name}{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(model.state_dict(), str(path))
    else:
        torch.save(model.state_dict(), path)
    return path, model.state_dict()


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a socket fails, as on an offline machine; the attempts are recorded."""
    attempts = []

    def refuse(address, timeout=None, *args, **kwargs):
        attempts.append((address, timeout))
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


@pytest.fixture
def empty_hub_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


@pytest.mark.parametrize("in_chans", [1, 3, 5])
def test_backbone_returns_pooled_features_for_any_channel_count(in_chans):
    backbone = create_backbone(TINY, in_chans=in_chans)
    features = backbone(torch.randn(2, in_chans, 32, 32))
    assert features.shape == (2, backbone.num_features)


def test_unknown_backbone_names_close_matches():
    with pytest.raises(ValueError, match=r"resnet_18.*resnet18.*model\.backbone") as info:
        create_backbone("resnet_18")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_file_loads_offline_into_another_channel_count(tmp_path, no_network, suffix):
    path, saved = tiny_weights_file(tmp_path, suffix=suffix)
    backbone = create_backbone(TINY, in_chans=1, pretrained=True, weights=str(path))
    loaded = backbone.state_dict()
    assert loaded["conv1.0.weight"].shape[1] == 1  # first convolution adapted to one channel
    assert torch.equal(loaded["conv1.0.weight"], saved["conv1.0.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(loaded["layer1.0.conv1.weight"], saved["layer1.0.conv1.weight"])
    assert no_network == []


@pytest.mark.parametrize("other", ["test_efficientnet", "resnet10t"])  # disjoint keys; same keys, other shapes
def test_weights_of_another_architecture_are_refused(tmp_path, other):
    path, _ = tiny_weights_file(tmp_path, name=other)
    with pytest.raises(ValueError, match=rf"{path}.*{TINY}"):
        create_backbone(TINY, weights=str(path))


def test_missing_weights_file_names_the_option(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model\.weights=.*nowhere\.safetensors"):
        create_backbone(TINY, weights=str(tmp_path / "nowhere.safetensors"))


def test_pretrained_with_hub_offline_fails_with_the_fix(monkeypatch, empty_hub_cache, no_network):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    message = rf"ImageNet weights for {TINY}.*model\.weights=.*model\.pretrained=false"
    with pytest.raises(ConnectionError, match=message):
        create_backbone(TINY, pretrained=True)
    assert no_network == []  # HF_HUB_OFFLINE=1 already says there is no network: not even a probe


def test_pretrained_with_unreachable_hub_probes_once_briefly(monkeypatch, empty_hub_cache, no_network):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(ConnectionError, match="model hub is unreachable"):
        create_backbone(TINY, pretrained=True)
    [(address, timeout)] = no_network
    assert address == ("huggingface.co", 443) and timeout <= 5


def test_pretrained_uses_weights_in_the_local_hub_cache(monkeypatch, tmp_path, empty_hub_cache, no_network):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    repo = empty_hub_cache / "models--timm--test_resnet.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    path, saved = tiny_weights_file(tmp_path)
    path.rename(repo / "snapshots" / "0123abcd" / "model.safetensors")
    backbone = create_backbone(TINY, pretrained=True)
    assert torch.equal(backbone.state_dict()["layer1.0.conv1.weight"], saved["layer1.0.conv1.weight"])


def test_head_can_be_the_resnet50_paper_head():
    head = build_head(512, 1, hidden=256, dropout=0.4, batchnorm=True)
    assert [type(layer) for layer in head] == [nn.Linear, nn.ReLU, nn.Dropout, nn.BatchNorm1d, nn.Linear]
    assert head[0].out_features == 256 and head[2].p == 0.4 and head[-1].out_features == 1
    head.eval()
    assert head(torch.randn(3, 512)).shape == (3, 1)


def test_default_head_is_one_linear_layer():
    head = build_head(96, 6)
    assert [type(layer) for layer in head] == [nn.Linear]


# Slice models; model=sequence is stage 2 over one of them (tests/test_sequence.py checks its keys).
MODEL_CONFIGS = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml") if not p.stem.startswith("_")
                       and p.stem != "sequence")


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_model_configs_select_a_timm_backbone_with_module_arguments(name):
    cfg = compose_config(None, [f"+model={name}"]).model
    module_args = set(inspect.signature(ICHLitModule).parameters)
    assert set(cfg) <= module_args
    assert set(cfg.head) == {"hidden", "dropout", "batchnorm"}
    assert timm.is_model(cfg.backbone) or cfg.backbone in SIMPLE_MODELS


@pytest.mark.parametrize("backbone", ["vgg11", "mobilenetv3_small_050"])
def test_backbones_with_a_pre_logits_block_get_a_head_of_the_right_width(backbone):
    """timm's num_features (vgg11 512, mobilenetv3_small_050 288) is not what they output without a classifier."""
    model = ICHLitModule(task="multilabel", backbone=backbone, in_chans=3)
    assert model(torch.rand(1, 3, 224, 224)).shape == (1, 6)


def test_model_group_selects_by_file_and_backbone_override_takes_any_timm_name():
    assert compose_config(None, ["+model=densenet121"]).model.backbone == "densenet121"
    assert compose_config(None, ["+model=xception"]).model.backbone == "legacy_xception"
    cfg = compose_config(None, ["+model=tiny", "model.backbone=convnext_atto"]).model
    assert cfg.backbone == "convnext_atto"
