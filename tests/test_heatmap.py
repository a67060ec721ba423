"""Heat maps on any backbone: a ViT's patch tokens and a channels-last network's maps give Grad-CAMs of the slice's
size that light up the region driving the output.

Each backbone is trained for one epoch through the project's config (a real checkpoint, as predict.py loads it; a
Swin replaces a trained backbone, as the config cannot make one small); then its head is set so that a bright
square raises the output, the one thing known to drive it, and the map must peak on that square.
"""

import numpy as np
import pytest
import timm
import torch
from torch import nn

from conftest import FAST_RUN, compose_config
from ich.inference.deploy import load_deployed
from ich.inference.heatmap import Stage, channels_first, grad_cam
from ich.train import run as train

# Its module fixture trains a checkpoint per backbone: the module stays on one worker under pytest-xdist.
pytestmark = pytest.mark.slow

SIZE = 160  # timm's test models are made for 160 px
BRAIN_HU, BLOOD_HU = 30, 75
SQUARE = (slice(32, 64), slice(96, 128))  # one cell of a 5x5 grid, two patches of a 16 px ViT: rows, columns


@pytest.fixture(scope="module")
def checkpoints(cache_dir, tmp_path_factory):
    """Run folders of one epoch on the phantom, per backbone, trained on first use."""
    runs = {}

    def run(backbone: str):
        if backbone not in runs:
            runs[backbone] = tmp_path_factory.mktemp(backbone)
            train(compose_config("train", [*FAST_RUN, f"model.backbone={backbone}", f"data.image_size={SIZE}",
                                           "task=binary", f"output_dir={runs[backbone]}", "test=false"]))
        return runs[backbone]

    return run


def tiny_swin() -> nn.Module:
    """A Swin Transformer small enough for a test (windowed attention, channels-last stages, 5x5 at the end):
    the project's config takes no model arguments, so it replaces the backbone of a trained checkpoint."""
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, img_size=SIZE,
                             window_size=5, embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))


@pytest.fixture(params=["test_vit", "swin"])
def deployed(request, checkpoints):
    """A tiny ViT (tokens [B, 1 + N, C]) or Swin (channels-last maps [B, H, W, C]) as predict.py loads it."""
    if request.param != "swin":
        return load_deployed(checkpoints(request.param))
    deployed = load_deployed(checkpoints("test_mambaout"))
    torch.manual_seed(0)
    deployed.module.model.backbone = tiny_swin().eval()
    return deployed


def driven_by_the_square(module) -> tuple[np.ndarray, np.ndarray]:
    """A plain slice and the same with a bright square; the module's head set so that the square raises its one
    output (the difference of their pooled features as weights)."""
    plain = np.full((1, 1, SIZE, SIZE), BRAIN_HU, np.int16)
    bright = plain.copy()
    bright[0, 0, SQUARE[0], SQUARE[1]] = BLOOD_HU
    with torch.no_grad():
        features = [module.model.features(module.planes(torch.from_numpy(hu)).float() / 255.0)
                    for hu in (plain, bright)]
    head = nn.Linear(features[0].shape[1], 1)
    with torch.no_grad():
        head.weight.copy_(features[1] - features[0])
        head.bias.fill_(-float(head.weight @ (features[0] + features[1])[0]) / 2)
    module.model.head = head
    return plain, bright


def test_a_heat_map_has_the_slices_size_and_peaks_on_the_region_that_drives_the_output(deployed):
    module = deployed.module
    plain, bright = driven_by_the_square(module)
    assert deployed(bright)[0, 0] > deployed(plain)[0, 0]

    (cam,) = grad_cam(module, bright, 0)
    assert cam.shape == (SIZE, SIZE) and cam.max() == pytest.approx(1.0)
    inside = np.zeros_like(cam, dtype=bool)
    inside[SQUARE] = True
    assert cam[inside].mean() > 2 * cam[~inside].mean()
    row, column = np.unravel_index(np.argmax(cam), cam.shape)
    assert 32 - 16 <= row < 64 + 16 and 96 - 16 <= column < 128 + 16


def test_a_channels_last_checkpoint_draws_maps_of_the_slices_size(checkpoints):
    """MambaOut, trained through the config: its maps (channels last) are drawn. Its Grad-CAM of a uniform slice
    is dominated by the padding at the edges, so no peak is asserted here: the Swin above checks the layout."""
    module = load_deployed(checkpoints("test_mambaout")).module
    hu = np.full((2, 1, SIZE, SIZE), BRAIN_HU, np.int16)
    hu[1, 0, SQUARE[0], SQUARE[1]] = BLOOD_HU
    cams = grad_cam(module, hu, 0)
    assert cams.shape == (2, SIZE, SIZE) and np.isfinite(cams).all() and (cams.max(axis=(1, 2)) > 0).all()


def test_tokens_and_channels_last_maps_keep_each_patch_in_its_place():
    tokens = Stage("blocks.1", nn.Identity(), tokens=True, channels_last=False, prefix=1)
    values = torch.arange(1 + 6).float()[None, :, None].repeat(1, 1, 2)  # [1, class + 2x3 patches, 2 channels]
    with pytest.raises(ValueError, match="not a square grid of patch tokens"):
        channels_first(tokens, values)
    values = torch.arange(1 + 4).float()[None, :, None].repeat(1, 1, 2)  # [1, class + 2x2 patches, 2 channels]
    assert channels_first(tokens, values)[0, 1].tolist() == [[1, 2], [3, 4]]  # row by row, the class token dropped

    nhwc = Stage("layers.3", nn.Identity(), tokens=False, channels_last=True, prefix=0)
    maps = torch.arange(2 * 3 * 4).float().reshape(1, 2, 3, 4)  # [1, H 2, W 3, C 4]
    assert channels_first(nhwc, maps)[0, :, 1, 2].tolist() == maps[0, 1, 2].tolist()


def test_predict_draws_a_vits_heat_maps_for_its_positive_studies(checkpoints, tmp_path):
    from ich.data.phantom import generate
    from ich.predict import run as predict

    generate(tmp_path / "export", patients=3, slices=6, size=64, seed=2, quirks=False)
    studies = predict(compose_config("predict", [f"ckpt_path={checkpoints('test_vit')}", f"input={tmp_path / 'export'}",
                                                 f"output_dir={tmp_path / 'out'}", "min_slices=4", "heatmaps=2"]))
    positive = int((studies["positive"] == 1).sum())
    assert positive > 0, "the operating point (95% sensitivity on validation) should call some phantom study"
    assert len(list((tmp_path / "out" / "heatmaps").glob("*.png"))) == 2 * positive
    assert "the input of its last block (blocks.5)" in (tmp_path / "out" / "report.html").read_text()
