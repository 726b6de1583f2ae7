"""Model zoo: plain, residual and PNNH nets (CNN, ViT, MLP) under one registry."""
from pnnh.models import cnn, mlp, vit  # noqa: F401  (registers the models)
from pnnh.models import baselines, twin  # noqa: F401
from pnnh.models.convert import ConversionError, convert
from pnnh.models.layers import CoderSpec, PNNHConv, PNNHLinear, PNNHStage
from pnnh.models.registry import count_params, create_model, list_models, register_model
from pnnh.models.shortcuts import find_shortcuts

__all__ = ["create_model", "list_models", "register_model", "count_params", "find_shortcuts",
           "CoderSpec", "PNNHConv", "PNNHStage", "PNNHLinear", "convert", "ConversionError"]
