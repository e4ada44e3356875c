"""`megabranch-convert SRC OUT --to ctranslate2|hf|fairseq`: the folded model written for a serving package,
read back by that package and checked against megabranch (serve_check.py) before OUT appears.

    ctranslate2   model.bin + config.json (ctranslate2's converter), source.spm / target.spm beside them;
                  --quantization as ctranslate2's (int8 ... float32): the fp32 model is checked first, the
                  quantized one's differences are printed
    hf            a MarianMT directory (export_hf.py)
    fairseq       checkpoint.pt + dict.<lang>.txt + the sentencepiece model (export_fairseq.py)
"""

from __future__ import annotations

import shutil

from ..errors import UserError
from . import export_ctranslate2 as ct2
from . import export_fairseq, export_hf
from .serve_check import check_export
from .serving import Export, write_directory, write_sidecar

TARGETS = ("ctranslate2", "hf", "fairseq")
NAMES = {"ctranslate2": "ctranslate2", "hf": "transformers", "fairseq": "fairseq"}


def check_quantization(to: str, quantization: str | None) -> None:
    if quantization is None:
        return
    if to != "ctranslate2":
        raise UserError(f"--quantization {quantization}: only --to ctranslate2 quantizes (--to {to} writes fp32)")
    if quantization not in ct2.QUANTIZATIONS:
        raise UserError(f"--quantization {quantization}: ctranslate2 has {', '.join(ct2.QUANTIZATIONS)}")


def export(to: str, ex: Export, out: str, quantization: str | None = None) -> dict:
    """Writes OUT (new) and returns what was compared."""
    check_quantization(to, quantization)
    compared = {}

    def fill(tmp: str) -> None:
        compared.update({"ctranslate2": _ctranslate2, "hf": _hf, "fairseq": _fairseq}[to](ex, tmp, quantization))
        write_sidecar(tmp, ex.sidecar(to, compared))

    write_directory(out, fill)
    print(f"wrote {out} ({NAMES[to]}; megabranch.json says each direction's source prefix)")
    return compared


def _ctranslate2(ex: Export, out: str, quantization: str | None) -> dict:
    files = {"source.spm": ex.spm_files()["source"], "target.spm": ex.spm_files()["target"]}
    pieces = (ex.pieces("source", ct2.PAD_PIECE), ex.pieces("target", ct2.PAD_PIECE))

    def spec():
        return ct2.build_spec(ex.folded, ex.mc, {s: ex.positions(s) for s in ("encoder", "decoder")}, ex.scale, *pieces)

    def checked(path: str, what: str, enforce: bool) -> dict:
        tr = ct2.translator(path, compute_type="float32" if enforce else "default")
        return check_export(
            what,
            "ctranslate2's",
            ex,
            lambda s, p: ct2.logits(tr, pieces, s, p),
            lambda s, b, lp, n: ct2.decode(tr, pieces, s, b, lp, n),
            enforce,
            limit_differs=True,
        )

    if quantization in (None, "float32"):
        ct2.write(spec(), out, None, files)
        return checked(out, "export -> ctranslate2", True)
    fp32 = out + ".fp32"
    try:
        ct2.write(spec(), fp32, None, {})
        compared = {"float32": checked(fp32, "export -> ctranslate2", True)}
    finally:
        shutil.rmtree(fp32, ignore_errors=True)
    ct2.write(spec(), out, quantization, files)
    compared[quantization] = checked(out, f"export -> {quantization} ctranslate2", False)
    return compared


def _hf(ex: Export, out: str, quantization: str | None) -> dict:
    export_hf.write(ex, out)
    model, _ = export_hf.load(out)
    return check_export(
        "export -> transformers",
        "transformers'",
        ex,
        lambda s, p: export_hf.logits(model, s, p),
        lambda s, b, lp, n: export_hf.decode(model, s, b, lp, n),
        limit_differs=True,
    )


def _fairseq(ex: Export, out: str, quantization: str | None) -> dict:
    export_fairseq.write(ex, out)
    hub = export_fairseq.load(out)
    return check_export(
        "export -> fairseq",
        "fairseq's",
        ex,
        lambda s, p: export_fairseq.logits(hub, s, p),
        lambda s, b, lp, n: export_fairseq.decode(hub, s, b, lp, n),
    )
