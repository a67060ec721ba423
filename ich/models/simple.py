"""The per-label paper's two small networks, trained from scratch: a three-convolution CNN and a dense network.

Both take 128x128 slices, the size the paper down-scaled to, and flatten their last feature map as the
paper did, so their widths are fixed by that size. Like timm models built with `num_classes=0` they
return features and expose `num_features`; the task's head (ich.models.build_head) adds the output layer,
which with the default head is the paper's single dense output unit.
"""

import torch
from torch import nn

INPUT_SIZE = 128


class SimpleCNN(nn.Module):
    """Conv 3x3 (32) -> max-pool -> conv 3x3 (64) -> max-pool -> conv 3x3 (128) -> flatten: 100,352 features.

    The paper's layer table, with ReLU after each convolution; its input had one grayscale channel,
    here every input channel is kept (one window repeated three times behaves as one channel).
    """

    def __init__(self, in_chans: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 32, kernel_size=3),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=3),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, kernel_size=3),
            nn.ReLU(inplace=True),
            nn.Flatten(),
        )
        side = ((INPUT_SIZE - 2) // 2 - 2) // 2 - 2  # 126 -> 63 -> 61 -> 30 -> 28
        self.num_features = 128 * side * side

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        check_input_size(image, "simple_cnn")
        return self.features(image)


class MLP(nn.Module):
    """The paper's dense network on the flattened grayscale slice: 16,384 -> 4,096 -> 1,024 -> 256 -> 64 -> 16 -> 4.

    Each layer is a quarter of the one before, with ReLU. The paper converted its images to grayscale;
    here the channels are averaged first, which with `data.windows=[brain]` is exactly the brain window.
    """

    def __init__(self, in_chans: int = 1) -> None:
        super().__init__()
        widths = [INPUT_SIZE * INPUT_SIZE, 4096, 1024, 256, 64, 16, 4]
        layers: list[nn.Module] = [nn.Flatten()]
        for width_in, width_out in zip(widths, widths[1:]):
            layers += [nn.Linear(width_in, width_out), nn.ReLU(inplace=True)]
        self.layers = nn.Sequential(*layers)
        self.num_features = widths[-1]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        check_input_size(image, "mlp")
        return self.layers(image.mean(dim=1))


SIMPLE_MODELS = {"simple_cnn": SimpleCNN, "mlp": MLP}


def create_simple(name: str, in_chans: int, pretrained: bool = False, weights: str | None = None) -> nn.Module:
    """One of SIMPLE_MODELS; they are trained from scratch, as in the paper, so there are no weights to load."""
    if pretrained or weights is not None:
        raise ValueError(
            f"model.backbone={name} has no pretrained weights: set model.pretrained=false and model.weights=null "
            "(model.init_from=CKPT starts from one of our checkpoints)."
        )
    return SIMPLE_MODELS[name](in_chans)


def check_input_size(image: torch.Tensor, name: str) -> None:
    """The flattened widths hold only for 128x128 slices: any other size fails with the setting to change."""
    if tuple(image.shape[-2:]) != (INPUT_SIZE, INPUT_SIZE):
        raise ValueError(
            f"model={name} takes {INPUT_SIZE}x{INPUT_SIZE} slices but got {tuple(image.shape[-2:])}: "
            f"set data.image_size={INPUT_SIZE}."
        )
