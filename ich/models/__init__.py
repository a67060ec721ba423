"""Backbones (any timm model) and the classification head."""

from ich.models.backbone import create_backbone
from ich.models.head import build_head
from ich.models.simple import MLP, SimpleCNN

__all__ = ["MLP", "SimpleCNN", "build_head", "create_backbone"]
