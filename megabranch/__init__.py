"""megabranch: a trainer for extremely deep encoder-decoder Transformers (Post-LN, Pre-LN, DeepNorm, BranchNorm)."""

__version__ = "0.1.0"
