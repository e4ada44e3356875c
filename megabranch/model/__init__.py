"""The encoder-decoder Transformer (defined once; slices of it are pipeline stages) and its loss."""

from ..vocab import PAD
from .init import draw_init_seed, initial_value
from .loss import label_smoothed_nll_loss
from .span import Span
from .transformer import (
    OutputProjection,
    Transformer,
    build_model,
    build_model_from,
    canonical_name,
    canonical_parameters,
    count_parameters,
    meta_model,
)

__all__ = [
    "PAD",
    "OutputProjection",
    "Span",
    "Transformer",
    "build_model",
    "build_model_from",
    "canonical_name",
    "canonical_parameters",
    "count_parameters",
    "draw_init_seed",
    "initial_value",
    "label_smoothed_nll_loss",
    "meta_model",
]
