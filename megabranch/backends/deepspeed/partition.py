"""DeepSpeed `parts` for megabranch's pipeline layout (pure Python: --dry-run uses it without DeepSpeed)."""

from __future__ import annotations

from ...config import Config
from ...planning.partition import plan_layout

PARTITIONS = ("megabranch", "parameters", "uniform", "type:<regex>")


def ds_parts(cfg: Config, pp: int, vocab: int, tgt_vocab: int | None = None) -> list[int]:
    """Stage s runs DeepSpeed layer indices [parts[s], parts[s+1]) (layers.layer_plan): the cost-model split of
    parallel.layout / plan_layout, with the source embedding riding with E0, the target embedding with D0 and the
    output projection with the last decoder layer (as in the native engine)."""
    p, mc = cfg.parallel, cfg.model
    n, m = mc.encoder_layers, mc.decoder_layers
    layout = plan_layout(mc, pp, 1, vocab, tgt_vocab, tp=p.tp, layout=p.layout, by=p.balance, recompute=p.recompute)

    def index(b: int) -> int:
        if b == 0:
            return 0
        if b < n:
            return 1 + b
        if b == n:
            return n + 1  # the target embedding starts the decoder's first stage
        if b < n + m:
            return n + 2 + (b - n)
        return n + m + 3

    return [index(b) for b in layout.bounds()]
