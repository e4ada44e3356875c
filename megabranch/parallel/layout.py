"""The pipeline layout: the model cut as one sequence of layers, encoder then decoder,

    E0 E1 ... E(N-1) D0 D1 ... D(M-1)

into K = pp * vpp contiguous chunks ("virtual stages"), placed on the pipeline ranks in one of two ways:

    interleaved   chunk c runs on rank c % pp (Megatron's placement: with vpp = 2 and pp = 4, rank 0 holds
                  chunks 0 and 4); every schedule but zb-v
    v             vpp = 2, chunk c < pp on rank c, chunk c >= pp on rank 2 pp - 1 - c (rank 0 holds the first and
                  the last chunk, rank pp - 1 the two middle ones, which hand over locally); the zb-v schedule

The extras ride with a fixed layer, so they are never an orphan stage (model/span.py):

    source embedding + positions      with E0
    target embedding + positions      with D0
    encoder final norm (pre_ln)       with E(N-1)
    decoder final norm, output projection and the loss   with D(M-1)

Layout strings (`parallel.layout`) list the chunks in pipeline order, separated by `|`; a chunk is a
comma-separated list of inclusive layer ranges `E<a>-<b>` / `D<a>-<b>` (or a single `E<a>` / `D<a>`):

    "E0-3|E4-5,D0|D1-3|D4-5"      6+6 layers over pp=2, vpp=2: rank 0 runs chunks 0 and 2, rank 1 chunks 1 and 3

Every layer must appear exactly once, in order, each chunk non-empty.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

from ..errors import UserError
from ..model.span import Span

PLACEMENTS = ("interleaved", "v")


def chunk_rank(index: int, pp: int, placement: str = "interleaved") -> int:
    """The pipeline rank that runs chunk `index` of pp * vpp chunks."""
    if placement == "v":
        return index if index < pp else 2 * pp - 1 - index
    return index % pp


def chunk_index(rank: int, virtual: int, pp: int, placement: str = "interleaved") -> int:
    """The chunk that rank `rank` runs as its `virtual`-th (the inverse of chunk_rank / chunk_virtual)."""
    if placement == "v":
        return rank if virtual == 0 else 2 * pp - 1 - rank
    return virtual * pp + rank


def chunk_virtual(index: int, pp: int) -> int:
    """Chunk `index`'s position among its rank's chunks, in either placement (0: the one nearer the start)."""
    return index // pp


@dataclass(frozen=True)
class Chunk(Span):
    """One virtual stage: a span of the model (encoder layers [enc_lo, enc_hi), decoder layers [dec_lo, dec_hi),
    the embeddings with E0 / D0, the output with D(M-1)) and where it runs."""

    index: int = 0  # position in the pipeline, 0 .. K-1
    pp: int = 1
    placement: str = "interleaved"  # how chunks map to ranks (PLACEMENTS)

    @classmethod
    def of_layers(
        cls, lo: int, hi: int, n_enc: int, n_dec: int, index: int = 0, pp: int = 1, placement: str = "interleaved"
    ) -> Chunk:
        return cls(**vars(Span.of_layers(lo, hi, n_enc, n_dec)), index=index, pp=pp, placement=placement)

    @property
    def span(self) -> Span:
        """What the chunk holds, without where it runs (what the model is built from)."""
        return Span(**{f.name: getattr(self, f.name) for f in fields(Span)})

    @property
    def rank(self) -> int:  # pipeline rank that runs it
        return chunk_rank(self.index, self.pp, self.placement)

    @property
    def virtual(self) -> int:  # its position among that rank's chunks
        return chunk_virtual(self.index, self.pp)


@dataclass(frozen=True)
class Layout:
    chunks: tuple  # of Chunk, in pipeline order
    pp: int
    vpp: int
    n_enc: int
    n_dec: int
    placement: str = "interleaved"

    def __str__(self) -> str:
        return "|".join(c.describe() for c in self.chunks)

    @property
    def num_chunks(self) -> int:
        return len(self.chunks)

    def chunks_of_rank(self, pp_rank: int) -> list:
        """The chunks pipeline rank `pp_rank` runs, in virtual order."""
        return sorted((c for c in self.chunks if c.rank == pp_rank), key=lambda c: c.virtual)

    def ranks_holding(self, what: str) -> list[int]:
        """Pipeline ranks holding 'src_embed', 'tgt_embed' or 'output'."""
        return sorted({c.rank for c in self.chunks if getattr(c, what)})

    @classmethod
    def from_bounds(
        cls, bounds: list[int], pp: int, vpp: int, n_enc: int, n_dec: int, placement: str = "interleaved"
    ) -> Layout:
        """Chunk c holds layers [bounds[c], bounds[c+1]) of the sequence E0..E(N-1) D0..D(M-1)."""
        if placement not in PLACEMENTS:
            raise ValueError(f"placement {placement!r}: must be one of {PLACEMENTS}")
        if placement == "v" and vpp != 2:
            raise UserError(
                f"parallel.vpp={vpp}: the V placement (schedule zb-v) runs exactly 2 chunks per rank; "
                f"set parallel.vpp=2"
            )
        chunks = tuple(
            Chunk.of_layers(bounds[c], bounds[c + 1], n_enc, n_dec, index=c, pp=pp, placement=placement)
            for c in range(len(bounds) - 1)
        )
        return cls(chunks, pp, vpp, n_enc, n_dec, placement)

    def bounds(self) -> list[int]:
        out = [0]
        for c in self.chunks:
            out.append(c.enc_hi + c.dec_hi if c.has_decoder else c.enc_hi)
        return out


_PART = re.compile(r"^([ED])(\d+)(?:-(\d+))?$")


def parse_layout(text: str, n_enc: int, n_dec: int, pp: int, vpp: int, placement: str = "interleaved") -> Layout:
    """Parse and validate a `parallel.layout` string; every problem is a one-line UserError."""
    want = pp * vpp
    pieces = [p.strip() for p in text.strip().split("|")]
    if len(pieces) != want:
        raise UserError(
            f"parallel.layout={text!r} has {len(pieces)} stages but parallel.pp * parallel.vpp = {pp} * {vpp} = {want}"
        )
    total = n_enc + n_dec
    bounds, pos = [0], 0  # pos: next expected layer in the sequence E0..E(N-1) D0..D(M-1)
    for s, piece in enumerate(pieces):
        if not piece:
            raise UserError(f"parallel.layout={text!r}: stage {s} is empty; every stage needs at least one layer")
        for item in (i.strip() for i in piece.split(",")):
            m = _PART.match(item)
            if not m:
                raise UserError(
                    f"parallel.layout={text!r}: cannot read {item!r} in stage {s}; write layer ranges like E0-3 or D5"
                )
            kind, lo = m.group(1), int(m.group(2))
            hi = int(m.group(3)) if m.group(3) is not None else lo
            n = n_enc if kind == "E" else n_dec
            if hi < lo:
                raise UserError(f"parallel.layout={text!r}: range {item} in stage {s} runs backwards")
            if hi >= n:
                raise UserError(
                    f"parallel.layout={text!r}: {item} in stage {s} is past the model's last {kind} layer "
                    f"({kind}{n - 1}; model.{'encoder' if kind == 'E' else 'decoder'}_layers={n})"
                )
            start = lo if kind == "E" else n_enc + lo
            if start != pos:
                expect = f"E{pos}" if pos < n_enc else f"D{pos - n_enc}"
                raise UserError(
                    f"parallel.layout={text!r}: stage {s} has {item} where {expect} comes next; "
                    f"list every layer once, encoder before decoder, in order"
                )
            pos = (hi if kind == "E" else n_enc + hi) + 1
        bounds.append(pos)
    if pos != total:
        missing = f"E{pos}" if pos < n_enc else f"D{pos - n_enc}"
        raise UserError(f"parallel.layout={text!r} stops before {missing}; it must cover all {n_enc}+{n_dec} layers")
    return Layout.from_bounds(bounds, pp, vpp, n_enc, n_dec, placement)
