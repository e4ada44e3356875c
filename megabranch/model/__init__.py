from .loss import label_smoothed_nll_loss
from .transformer import PAD, Transformer, build_model, count_parameters

__all__ = ["PAD", "Transformer", "build_model", "count_parameters", "label_smoothed_nll_loss"]
