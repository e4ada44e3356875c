"""Tiny configs: a model small enough for the CPU, the pipeline-harness config, and the pp=2 YAML of the launch
tests."""

from __future__ import annotations

from megabranch.config import Config, ModelConfig

VOCAB = 40  # the harness vocabulary: divisible by 1, 2, 4 (tensor-parallel vocabulary shards)


def tiny_model_cfg(**kw) -> ModelConfig:
    base = dict(encoder_layers=2, decoder_layers=2, d_model=32, n_heads=4, ffn_dim=64, dropout=0.0, max_positions=64)
    base.update(kw)
    return ModelConfig(**base)


def make_cfg(enc: int = 4, dec: int = 4, m: int = 2, **parallel) -> Config:
    """A tiny deep BranchNorm model whose alpha moves every step (warmup 10), dropout off, clipping on."""
    cfg = Config()
    cfg.model = tiny_model_cfg(
        encoder_layers=enc,
        decoder_layers=dec,
        residual=parallel.pop("residual", "branchnorm"),
        alpha_warmup_steps=10,
        **parallel.pop("model", {}),
    )
    o = cfg.optim
    o.lr, o.warmup_updates, o.update_freq, o.clip_norm, o.label_smoothing = 1e-3, 5, m, 1.0, 0.1
    for k, v in parallel.items():
        object.__setattr__(cfg.parallel, k, v)  # also options a newer ParallelConfig may add (zero, ...)
    return cfg


_PP2_MODEL = (
    "model: {encoder_layers: 2, decoder_layers: 2, d_model: 16, n_heads: 2, ffn_dim: 32, dropout: 0.0,"
    " alpha_warmup_steps: 4, max_positions: 64}\nparallel: {pp: 2, layout: 'E0-1|D0-1'}\n"
)


def tiny_pp2_yaml(data_dir: str, save_dir: str | None = None, **optim) -> str:
    """A 2L-2L d=16 model over two pipeline stages (E0-1|D0-1); with a save directory, the logging of a short
    training run (every step logged, validation every 2 steps, no BLEU, no TensorBoard)."""
    text = _PP2_MODEL + "optim: {" + ", ".join(f"{k}: {v}" for k, v in optim.items()) + "}\n"
    text += f"data: {{data_dir: '{data_dir}', max_tokens: 200}}\n"
    if save_dir is not None:
        text += (
            f"log: {{save_dir: '{save_dir}', log_interval: 1, valid_interval: 2, bleu_sentences: 0,"
            " tensorboard: false, progress: none}\n"
        )
    return text
