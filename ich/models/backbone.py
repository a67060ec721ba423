"""Build a timm backbone that returns pooled features, with weights from a local file or the model hub.

Training machines are often offline, so every way to get ImageNet weights either works without the
network (a local file, the local cache) or fails within seconds with a sentence that says what to do.
"""

import difflib
import logging
import socket
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import huggingface_hub
import timm
import torch
from torch import nn

from ich.models.simple import SIMPLE_MODELS, create_simple

log = logging.getLogger(__name__)

HUB_TIMEOUT_S = 3.0
# The files timm looks for in a Hugging Face repository, in its order of preference.
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def create_backbone(
    name: str, in_chans: int = 3, pretrained: bool = False, weights: str | None = None
) -> nn.Module:
    """A timm model without classifier (`num_classes=0`): forward gives [B, num_features] pooled features.

    `weights` (a .safetensors/.pth file) wins over `pretrained`; timm adapts the first convolution when
    `in_chans` differs from the 3 channels the weights were trained on. The papers' small networks
    (`simple_cnn`, `mlp`: ich.models.simple) are built here too, under the same contract.
    """
    if name in SIMPLE_MODELS:
        return create_simple(name, in_chans, pretrained, weights)
    check_backbone_name(name)
    if weights is not None:
        return _from_file(name, in_chans, Path(weights))
    if pretrained:
        return _from_hub(name, in_chans)
    return timm.create_model(name, num_classes=0, in_chans=in_chans)


def check_backbone_name(name: str) -> None:
    """Reject a name timm does not know, suggesting the closest ones (typos like `resnet_18` are common)."""
    if name in SIMPLE_MODELS or timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ValueError(f"Unknown backbone '{name}'{hint}: set model.backbone to a timm model name.")


def _from_file(name: str, in_chans: int, path: Path) -> nn.Module:
    """Load weights offline, strictly: a file of another architecture must fail, not load nothing."""
    if not path.is_file():
        raise FileNotFoundError(
            f"model.weights={path} does not exist: pass a .safetensors or .pth file of {name} weights."
        )
    state_dict = timm.models.load_state_dict(str(path))  # safetensors, or torch.load(weights_only=True)
    # timm drops the classifier itself but then loads non-strictly; dropping it here keeps the load strict.
    cfg = timm.models.get_pretrained_cfg(name)
    classifiers = cfg.classifier if cfg and cfg.classifier else ()
    for classifier in (classifiers,) if isinstance(classifiers, str) else classifiers:
        state_dict.pop(f"{classifier}.weight", None)
        state_dict.pop(f"{classifier}.bias", None)
    try:
        return timm.create_model(
            name,
            pretrained=True,
            pretrained_cfg_overlay=dict(state_dict=state_dict, num_classes=0),
            num_classes=0,
            in_chans=in_chans,
        )
    except (RuntimeError, KeyError) as err:
        raise ValueError(
            f"model.weights={path} does not hold weights for backbone {name}: pass a file saved from {name} "
            "(to start from one of our Lightning checkpoints use model.init_from instead)."
        ) from err


def _from_hub(name: str, in_chans: int) -> nn.Module:
    """ImageNet weights from the local cache if there, else from the hub only if it answers within seconds."""
    address, cached = _weights_source(name)
    if cached is not None:
        log.info("Loading %s ImageNet weights from the local cache %s", name, cached)
        return _from_file(name, in_chans, cached)
    if not _reachable(address):
        raise ConnectionError(
            f"Cannot download ImageNet weights for {name}: the model hub is unreachable; download them elsewhere "
            "and pass model.weights=/path/to/file.safetensors (or set model.pretrained=false)."
        )
    return timm.create_model(name, pretrained=True, num_classes=0, in_chans=in_chans)


def _weights_source(name: str) -> tuple[tuple[str, int], Path | None]:
    """Where timm would download `name`'s default weights from (host, port), and their cached copy if any."""
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is not None and cfg.hf_hub_id:
        repo_id, _, revision = cfg.hf_hub_id.partition("@")
        for filename in (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HF_WEIGHT_FILES:
            hit = huggingface_hub.try_to_load_from_cache(repo_id, filename, revision=revision or None)
            if isinstance(hit, str):
                return _address(huggingface_hub.constants.ENDPOINT), Path(hit)
        return _address(huggingface_hub.constants.ENDPOINT), None
    if cfg is not None and cfg.url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name
        return _address(cfg.url), cached if cached.is_file() else None
    raise ValueError(f"timm has no pretrained weights for backbone {name}: set model.pretrained=false.")


def _address(url: str) -> tuple[str, int]:
    """(host, port) of a URL, for the reachability probe."""
    parsed = urlparse(url)
    return parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80)


def _reachable(address: tuple[str, int]) -> bool:
    """Whether a TCP connection opens within HUB_TIMEOUT_S (through the HTTPS proxy when one is set).

    The hub client retries for about 46 s when offline; a 3 s probe turns that into a prompt message.
    HF_HUB_OFFLINE=1 means the user already said there is no network.
    """
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return False
    proxy = urllib.request.getproxies().get("https")
    if proxy and not urllib.request.proxy_bypass(address[0]):
        address = _address(proxy)
    try:
        socket.create_connection(address, timeout=HUB_TIMEOUT_S).close()
    except OSError:
        return False
    return True
