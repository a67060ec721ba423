"""Heat maps on any backbone: a ViT's patch tokens and a channels-last network's maps give Grad-CAMs of the
slice's size that light up the region driving the output.

Each backbone is trained for one epoch through the project's config (a real checkpoint, as predict.py loads it);
then its head is set so that a bright square raises the output, the one thing known to drive it, and the map
must peak on that square.
"""

import numpy as np
import pytest
import torch
from torch import nn

from conftest import FAST_RUN, compose_config
from ich.deploy import load_deployed
from ich.heatmap import grad_cam, last_stage
from ich.train import run as train

# Its module fixture trains a checkpoint per backbone: the module stays on one worker under pytest-xdist.
pytestmark = [pytest.mark.xdist_group("heatmap"), pytest.mark.slow]

SIZE = 160  # timm's test models are made for 160 px
BRAIN_HU, BLOOD_HU = 30, 75
SQUARE = (slice(32, 64), slice(96, 128))  # one cell of a 5x5 grid, two patches of a 16 px ViT: rows, columns


@pytest.fixture(scope="module", params=["test_vit", "test_mambaout"])
def deployed(request, cache_dir, tmp_path_factory):
    """A checkpoint of a tiny ViT (tokens [B, 1 + N, C]) or MambaOut (channels-last maps [B, H, W, C])."""
    run = tmp_path_factory.mktemp(request.param)
    train(compose_config("train", [*FAST_RUN, f"model.backbone={request.param}", f"data.image_size={SIZE}",
                                   "task=binary", f"output_dir={run}", "test=false"]))
    return load_deployed(run)


def driven_by_the_square(module) -> tuple[np.ndarray, np.ndarray]:
    """A plain slice and the same with a bright square; the module's head set so that the square raises its one
    output (the difference of their pooled features as weights)."""
    plain = np.full((1, 1, SIZE, SIZE), BRAIN_HU, np.int16)
    bright = plain.copy()
    bright[0, 0, SQUARE[0], SQUARE[1]] = BLOOD_HU
    with torch.no_grad():
        features = [module.model.features(module.planes(torch.from_numpy(hu)).float() / 255.0) for hu in (plain, bright)]
    head = nn.Linear(features[0].shape[1], 1)
    with torch.no_grad():
        head.weight.copy_(features[1] - features[0])
        head.bias.fill_(-float(head.weight @ (features[0] + features[1])[0]) / 2)
    module.model.head = head
    return plain, bright


def test_a_heat_map_has_the_slices_size_and_peaks_on_the_region_that_drives_the_output(deployed):
    module = deployed.module
    assert last_stage(module) is not None
    plain, bright = driven_by_the_square(module)
    assert deployed(bright)[0, 0] > deployed(plain)[0, 0]

    (cam,) = grad_cam(module, bright, 0)
    assert cam.shape == (SIZE, SIZE) and cam.max() == pytest.approx(1.0)
    inside = np.zeros_like(cam, dtype=bool)
    inside[SQUARE] = True
    assert cam[inside].mean() > 2 * cam[~inside].mean()
    row, column = np.unravel_index(np.argmax(cam), cam.shape)
    assert 32 - 16 <= row < 64 + 16 and 96 - 16 <= column < 128 + 16
