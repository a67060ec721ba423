"""The per-label paper's small CNN and dense network, built and trained like any other backbone."""

import pytest
import torch

from conftest import FAST_RUN, compose_config
from ich.models import build_head, create_backbone
from ich.train import run


def parameters(*modules) -> int:
    return sum(p.numel() for module in modules for p in module.parameters())


@pytest.mark.parametrize("name, total", [("simple_cnn", 193_025), ("mlp", 71_588_249)])
def test_small_networks_have_the_papers_parameter_counts(name, total):
    """With one grayscale channel and one output, the layer tables of the paper give these totals."""
    backbone = create_backbone(name, in_chans=1)
    head = build_head(backbone.num_features, 1)
    assert parameters(backbone, head) == total
    assert backbone(torch.rand(2, 3 if name == "mlp" else 1, 128, 128)).shape == (2, backbone.num_features)


def test_other_input_sizes_name_the_setting_to_change():
    backbone = create_backbone("simple_cnn", in_chans=3)
    with pytest.raises(ValueError, match="set data.image_size=128"):
        backbone(torch.rand(1, 3, 64, 64))


def test_small_networks_have_no_pretrained_weights():
    with pytest.raises(ValueError, match="set model.pretrained=false"):
        create_backbone("mlp", in_chans=3, pretrained=True)


def test_the_small_cnn_trains_through_train_py(cache_dir, tmp_path):
    cfg = compose_config("train", [*FAST_RUN, "model=simple_cnn", "data.image_size=128", f"output_dir={tmp_path}"])
    metrics = run(cfg)
    assert cfg.callbacks.early_stopping.patience == 3
    assert {"test/acc", "test/auroc", "val/auroc_best"} <= set(metrics)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
