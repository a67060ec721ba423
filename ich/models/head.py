"""The classification head on top of the pooled backbone features."""

from torch import nn


def build_head(
    in_features: int, num_outputs: int, hidden: int | None = None, dropout: float = 0.0, batchnorm: bool = False
) -> nn.Sequential:
    """[Linear(hidden) + ReLU] -> Dropout -> [BatchNorm1d] -> Linear(num_outputs); bracketed parts optional.

    With hidden=256, dropout=0.4, batchnorm=True this is the ResNet50 paper's head (after global average
    pooling, which timm does); the defaults give a plain linear classifier.
    """
    layers: list[nn.Module] = []
    width = in_features
    if hidden:
        layers += [nn.Linear(in_features, hidden), nn.ReLU(inplace=True)]
        width = hidden
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    if batchnorm:
        layers.append(nn.BatchNorm1d(width))
    layers.append(nn.Linear(width, num_outputs))
    return nn.Sequential(*layers)
