"""Where a slice's prediction comes from: Grad-CAM on the backbone's last convolutional stage, beside the slice.

Grad-CAM (Selvaraju et al. 2017) weights each feature map of the last stage by the mean gradient of one output's
logit over it, sums them and keeps the positive part: coarse (1/32 of the image for a ResNet), but it shows which
region raised the score. It needs the torch model, so it is drawn for checkpoints, not for exported files.
"""

import cv2
import numpy as np
import torch
from matplotlib import colormaps
from torch import nn

from ich.data.windows import WINDOWS, Window
from ich.deploy import HUModel

BRAIN = Window(*WINDOWS["brain"])  # what the plain slice is shown in: the window head CT is read in
OVERLAY_ALPHA = 0.45  # the map's share of a fully "hot" pixel; cold pixels show the slice alone


def last_stage(module: HUModel) -> tuple[str, nn.Module] | None:
    """The backbone's last feature stage as timm names it (`layer4` of a ResNet, `features.norm5` of a DenseNet);
    None for a backbone without feature maps (the papers' MLP and small CNN)."""
    backbone = module.model.backbone
    info = getattr(backbone, "feature_info", None)
    if not info:
        return None
    name = info[-1]["module"] if isinstance(info, list) else info.module_name()[-1]
    return name, backbone.get_submodule(name)


def grad_cam(module: HUModel, hu: np.ndarray, output: int) -> np.ndarray:
    """Grad-CAM maps [B, S, S] in [0, 1] of `output`'s logit for int16 HU stacks [B, 2k+1, S, S], the model's
    planes made by the deployed model itself (windows, context, channels as in training).

    Each map is scaled by its own maximum: it says where, not how much (the probability says that).
    """
    found = last_stage(module)
    if found is None:
        raise ValueError(f"backbone {module.model.hparams.backbone} has no feature maps to draw a Grad-CAM from")
    kept: list[torch.Tensor] = []
    hook = found[1].register_forward_hook(lambda layer, inputs, result: kept.append(result))
    try:
        with torch.enable_grad():
            planes = module.planes(torch.from_numpy(np.ascontiguousarray(hu)))
            # float input that requires grad: the activations do too, though a deployed model's weights do not
            image = planes.float().div(255.0).requires_grad_(True)
            logits = module.model(image)
            (gradient,) = torch.autograd.grad(logits[:, output].sum(), kept[-1])
    finally:
        hook.remove()
    weights = gradient.float().mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * kept[-1].detach().float()).sum(dim=1)).numpy()
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
