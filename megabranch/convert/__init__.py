"""`megabranch-convert`: move checkpoints between parallel layouts and formats, and average them.

The modules, one job each:

    cli.py               the command: argument parsing, source detection and loading, the conversions, `average`
    layouts.py           full tensors -> a step directory for any (tp, pp, vpp) grid (rank_params, write_layout)
    check.py             the self-check every conversion runs: logits of source and result on a fixed batch, and
                         against another package's own model (check_against_source)
    safetensors_io.py    .safetensors files through the `safetensors` package (memory-mapped reads, atomic writes)
    torchscale_names.py  torchscale EncoderDecoder / fairseq transformer parameter names <-> megabranch's
    fairseq_import.py    a fairseq checkpoint's arguments and dictionary -> ModelConfig and sentencepiece ids
    peers.py             the real torchscale and fairseq (optional): build their models, run them
    interop.py           the torchscale / fairseq conversions, each checked against the real package
    folding.py           every residual scheme rewritten as the plain Transformer the serving packages run
    serving.py           what every serving export shares (vocabulary, positions, sentencepiece, its directory)
    export_ctranslate2.py / export_hf.py / export_fairseq.py    one serving package each: write, load, run
    targets.py           --to ctranslate2 | hf | fairseq: write, check against the package, publish
    serve_check.py       the serving exports' check: logits and hypotheses next to megabranch's

`python -m megabranch.convert ...` is the same command (see cli.py for its usage).
"""

from .check import SOURCE_TOLERANCE, TOLERANCE, build_single, check, check_against_source, fixed_batch, logits_of
from .cli import main
from .layouts import rank_params, write_layout
from .safetensors_io import load_safetensors, save_safetensors
from .torchscale_names import export_torchscale, import_torchscale, torchscale_name

__all__ = [
    "SOURCE_TOLERANCE",
    "TOLERANCE",
    "build_single",
    "check",
    "check_against_source",
    "export_torchscale",
    "fixed_batch",
    "import_torchscale",
    "load_safetensors",
    "logits_of",
    "main",
    "rank_params",
    "save_safetensors",
    "torchscale_name",
    "write_layout",
]
