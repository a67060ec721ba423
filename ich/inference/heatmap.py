"""Where a slice's prediction comes from: Grad-CAM on the backbone's last stage, beside the slice.

Grad-CAM (Selvaraju et al. 2017) weights each feature map of the last stage by the mean gradient of one output's
logit over it, sums them and keeps the positive part: coarse (1/32 of the image for a ResNet), but it shows which
region raised the score. Any timm backbone: CNN maps channels first, Swin's and MambaOut's channels last, a
ViT's patch tokens laid back on their grid. It needs the torch model, so it is drawn for checkpoints, not for
exported files.
"""

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from matplotlib import colormaps
from torch import nn

from ich.data.windows import WINDOWS, Window
from ich.inference.deploy import HUModel

BRAIN = Window(*WINDOWS["brain"])  # what the plain slice is shown in: the window head CT is read in
OVERLAY_ALPHA = 0.45  # the map's share of a fully "hot" pixel; cold pixels show the slice alone


@dataclass(frozen=True)
class Stage:
    """Where Grad-CAM reads a backbone: a layer, and how its activations lay out the image."""

    name: str  # as timm names it: `layer4` of a ResNet, `layers.3` of a Swin, `blocks.11` of a ViT
    layer: nn.Module
    tokens: bool  # a transformer's [B, prefix + H*W, C] tokens, read at the input of its last block
    channels_last: bool  # [B, H, W, C] maps (timm's output_fmt NHWC: Swin, MambaOut); else [B, C, H, W]
    prefix: int  # class and register tokens before the patch tokens

    def describe(self) -> str:
        return f"the input of its last block ({self.name})" if self.tokens else f"its last stage ({self.name})"


def last_stage(module: HUModel) -> Stage | None:
    """The backbone's last feature stage as timm names it; None for a backbone without feature maps (the papers'
    MLP and small CNN).

    A ViT pools its class token after the last block, so the patch tokens that leave that block reach no output:
    Grad-CAM reads them as they enter it, where the last attention still mixes them into the class token.
    """
    backbone = module.model.backbone
    info = getattr(backbone, "feature_info", None)
    if not info:
        return None
    name = info[-1]["module"] if isinstance(info, list) else info.module_name()[-1]
    prefix = getattr(backbone, "num_prefix_tokens", None)
    return Stage(name, backbone.get_submodule(name), tokens=prefix is not None,
                 channels_last=getattr(backbone, "output_fmt", "NCHW") == "NHWC", prefix=int(prefix or 0))


def channels_first(stage: Stage, activations: torch.Tensor) -> torch.Tensor:
    """The stage's activations (or their gradient) as [B, C, H, W] maps."""
    if stage.tokens:
        patches = activations[:, stage.prefix:]
        side = math.isqrt(patches.shape[1])
        if activations.ndim != 3 or side * side != patches.shape[1]:
            raise ValueError(f"{stage.name} gives {tuple(activations.shape)}, not a square grid of patch tokens")
        return patches.transpose(1, 2).unflatten(2, (side, side))
    if activations.ndim != 4:
        raise ValueError(f"{stage.name} gives {tuple(activations.shape)}, not feature maps")
    return activations.permute(0, 3, 1, 2) if stage.channels_last else activations


def grad_cam(module: HUModel, hu: np.ndarray, output: int) -> np.ndarray:
    """Grad-CAM maps [B, S, S] in [0, 1] of `output`'s logit for int16 HU stacks [B, 2k+1, S, S], the model's
    planes made by the deployed model itself (windows, context, channels as in training).

    Each map is scaled by its own maximum: it says where, not how much (the probability says that).
    """
    stage = last_stage(module)
    if stage is None:
        raise ValueError(f"backbone {module.model.hparams.backbone} has no feature maps to draw a Grad-CAM from")
    kept: list[torch.Tensor] = []
    if stage.tokens:
        hook = stage.layer.register_forward_pre_hook(lambda layer, inputs: kept.append(inputs[0]))
    else:
        hook = stage.layer.register_forward_hook(lambda layer, inputs, result: kept.append(result))
    try:
        with torch.enable_grad():
            planes = module.planes(torch.from_numpy(np.ascontiguousarray(hu)))
            # float input that requires grad: the activations do too, though a deployed model's weights do not
            image = planes.float().div(255.0).requires_grad_(True)
            logits = module.model(image)
            (gradient,) = torch.autograd.grad(logits[:, output].sum(), kept[-1])
    finally:
        hook.remove()
    maps, gradient = channels_first(stage, kept[-1].detach().float()), channels_first(stage, gradient.float())
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * maps).sum(dim=1)).numpy()
    size = hu.shape[-1]
    maps = np.stack([cv2.resize(one, (size, size), interpolation=cv2.INTER_LINEAR) for one in cam])
    peak = maps.reshape(len(maps), -1).max(axis=1)
    return maps / np.where(peak > 0, peak, 1.0)[:, None, None]


def side_by_side(hu: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """RGB uint8 [S, 2S + gap, 3]: the slice in the brain window, and the same slice under its map (jet)."""
    plain = np.repeat(BRAIN(hu)[..., None], 3, axis=2).astype(np.float32)
    hot = colormaps["jet"](cam)[..., :3] * 255.0
    alpha = OVERLAY_ALPHA * cam[..., None]
    overlay = plain * (1 - alpha) + hot * alpha
    gap = np.full((hu.shape[0], max(2, hu.shape[1] // 32), 3), 255.0)
    return np.concatenate([plain, gap, overlay], axis=1).round().astype(np.uint8)
