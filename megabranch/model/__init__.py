from .loss import label_smoothed_nll_loss
from .transformer import PAD, Transformer, build_model, build_model_from, count_parameters

__all__ = ["PAD", "Transformer", "build_model", "build_model_from", "count_parameters", "label_smoothed_nll_loss"]
