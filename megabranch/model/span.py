"""Which pieces of the encoder-decoder a module holds: the whole model, or the slice one pipeline stage owns.

The model runs as one sequence of pieces,

    source embedding, E0 .. E(N-1) (+ encoder final norm), target embedding, D0 .. D(M-1) (+ decoder final
    norm), output projection

and a `Span` names a contiguous run of them. `Transformer(cfg, ..., span=...)` builds only that run, and its
forward runs only that run: what enters (`receives`) is what the previous span returned, what leaves (`sends`)
is what the next span needs. A final norm belongs to the last layer of its stack. The native pipeline's chunks
put the embeddings with E0 / D0 and the output with D(M-1); DeepSpeed's layer list gives each embedding and the
output a span of its own. Both are slices of the one model.

What travels between spans (`receives` / `sends`, a tuple of `Carried`):

    (ENCODER_HIDDEN,)           (B, S, d)   the encoder hidden, inside the encoder
    (MEMORY,)                   (B, S, d)   the finished encoder output, before the decoder starts
    (MEMORY, DECODER_HIDDEN)    (B, S, d), (B, T, d)   the encoder output and the decoder hidden
    ()                          nothing (the first span reads tokens; the last one returns logits)

Under DLCL (model.residual=dlcl) a hidden is the stack's history instead, every entry a later layer combines:
(h, B, S, d) / (h, B, T, d) with h = 1 + the layers of that stack before the boundary (the embedding, then each
layer's normalised output); `message_shapes` gives the shapes either way.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Carried(enum.Enum):
    ENCODER_HIDDEN = "encoder hidden"
    MEMORY = "memory"
    DECODER_HIDDEN = "decoder hidden"


@dataclass(frozen=True)
class Span:
    n_enc: int  # layers of the whole model's encoder / decoder
    n_dec: int
    enc_lo: int = 0  # encoder layers [enc_lo, enc_hi), decoder layers [dec_lo, dec_hi) held
    enc_hi: int = 0
    dec_lo: int = 0
    dec_hi: int = 0
    src_embed: bool = False
    tgt_embed: bool = False
    output: bool = False

    @classmethod
    def full(cls, n_enc: int, n_dec: int) -> Span:
        return cls(n_enc, n_dec, 0, n_enc, 0, n_dec, True, True, True)

    @classmethod
    def of_layers(cls, lo: int, hi: int, n_enc: int, n_dec: int) -> Span:
        """Layers [lo, hi) of the sequence E0..E(N-1) D0..D(M-1), with the embeddings riding with E0 and D0 and
        the output projection with D(M-1) (the native pipeline's chunks)."""
        enc_lo, enc_hi = min(lo, n_enc), min(hi, n_enc)
        dec_lo, dec_hi = max(lo - n_enc, 0), max(hi - n_enc, 0)
        return cls(
            n_enc,
            n_dec,
            enc_lo,
            enc_hi,
            dec_lo,
            dec_hi,
            src_embed=enc_lo == 0 and enc_hi > 0,
            tgt_embed=dec_lo == 0 and dec_hi > 0,
            output=dec_hi == n_dec and dec_hi > dec_lo,
        )

    @property
    def has_encoder(self) -> bool:
        """Holds encoder layers (not only the source embedding)."""
        return self.enc_hi > self.enc_lo

    @property
    def has_decoder(self) -> bool:
        return self.dec_hi > self.dec_lo

    @property
    def runs_encoder(self) -> bool:
        return self.src_embed or self.has_encoder

    @property
    def runs_decoder(self) -> bool:
        return self.tgt_embed or self.has_decoder or self.output

    @property
    def ends_encoder(self) -> bool:
        """Holds E(N-1), so its output is the finished encoder output (after pre_ln's final norm)."""
        return self.has_encoder and self.enc_hi == self.n_enc

    @property
    def ends_decoder(self) -> bool:
        """Holds D(M-1), and with it the decoder's final norm."""
        return self.has_decoder and self.dec_hi == self.n_dec

    @property
    def receives(self) -> tuple[Carried, ...]:
        if self.src_embed:
            return ()
        if self.has_encoder:
            return (Carried.ENCODER_HIDDEN,)
        return (Carried.MEMORY,) if self.tgt_embed else (Carried.MEMORY, Carried.DECODER_HIDDEN)

    @property
    def sends(self) -> tuple[Carried, ...]:
        if self.output:
            return ()
        if self.runs_decoder:
            return (Carried.MEMORY, Carried.DECODER_HIDDEN)
        return (Carried.MEMORY,) if self.ends_encoder else (Carried.ENCODER_HIDDEN,)

    def message_shapes(self, incoming: bool, b: int, s: int, t: int, d: int, history: bool = False) -> list[tuple]:
        """The shapes of what this span receives (incoming) or sends, for a micro-batch of b sentences, s source
        and t target tokens; history: DLCL's, whose hiddens carry every earlier layer's output (docstring)."""
        out = []
        for what in self.receives if incoming else self.sends:
            if what is Carried.MEMORY:
                out.append((b, s, d))
                continue
            encoder = what is Carried.ENCODER_HIDDEN
            shape = (b, s, d) if encoder else (b, t, d)
            layers_before = (
                (self.enc_lo if incoming else self.enc_hi) if encoder else (self.dec_lo if incoming else self.dec_hi)
            )
            out.append((layers_before + 1, *shape) if history else shape)
        return out

    def describe(self) -> str:
        """E.g. 'E0-3', 'E4-5,D0', 'D6-11' (layer ranges; the embeddings and output are implied by the layers
        in a native chunk), or 'src_embed' / 'tgt_embed' / 'output' for a span holding only that."""
        parts = []
        if self.has_encoder:
            parts.append(_layer_range("E", self.enc_lo, self.enc_hi))
        if self.has_decoder:
            parts.append(_layer_range("D", self.dec_lo, self.dec_hi))
        if not parts:
            parts = [n for n in ("src_embed", "tgt_embed", "output") if getattr(self, n)]
        return ",".join(parts)


def _layer_range(stack: str, lo: int, hi: int) -> str:
    return f"{stack}{lo}" if hi - lo == 1 else f"{stack}{lo}-{hi - 1}"
