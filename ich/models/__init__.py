"""Backbones (any timm model) and the classification head."""

from ich.models.backbone import create_backbone
from ich.models.head import build_head

__all__ = ["build_head", "create_backbone"]
