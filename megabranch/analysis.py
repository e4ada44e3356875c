"""Measurements behind the BranchNorm paper's analysis figures, on any megabranch Transformer.

- adjacent-layer cosine similarity (its Figure 8): for layer i of a stack, the cosine between the layer's input
  (the previous layer's output, or the embedding for layer 0) and its output, per token, averaged over non-pad
  tokens. Values near 1 mean the layer barely changes the representation ("representation collapse").
- FFN activation density / sparsity (its Figure 9): the fraction of non-zero entries of act(fc1(x)) over
  non-pad tokens, read with a forward hook on each FFN's fc1 (the activation is a function, not a module).
  `sparsity = 1 - nonzero_frac`.
- per-layer gradient norms on a batch: the L2 norm of the gradient of every parameter of one layer together.

Everything runs in eval mode (no dropout) at the model's current alpha, and leaves the model's gradients as
it found them (zeroed to None).
"""

from __future__ import annotations

import csv
import math

import torch
from torch import nn

from .model import PAD, label_smoothed_nll_loss
from .model.ffn import FeedForward

# --- pure measurement functions (what the tests check on constructed cases) --------------------------------


def token_cosine(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-8) -> float:
    """Mean over tokens (mask True = counted) of cos(a[t], b[t]); a, b are (..., d), mask is a's shape minus d."""
    a, b = a.double(), b.double()
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(eps)
    if mask is not None:
        cos = cos[mask]
    return float(cos.mean())


def adjacent_cosine(reps: list[torch.Tensor], mask: torch.Tensor | None = None) -> list[float]:
    """cos(reps[i], reps[i+1]) token-averaged, for each adjacent pair: len(reps) - 1 values."""
    return [token_cosine(reps[i], reps[i + 1], mask) for i in range(len(reps) - 1)]


def nonzero_fraction(acts: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Fraction of entries != 0 in acts (..., ffn_dim), over the tokens where mask is True (nan for None)."""
    if acts is None:
        return float("nan")
    if mask is not None:
        acts = acts[mask]
    return float(acts.ne(0).double().mean()) if acts.numel() else float("nan")


def grad_norm(params) -> float:
    """L2 norm of the gradients of `params` together (parameters without a gradient count as zero)."""
    total = 0.0
    for p in params:
        if p.grad is not None:
            total += float(p.grad.detach().double().pow(2).sum())
    return math.sqrt(total)


def module_grad_norms(modules: dict[str, nn.Module]) -> dict[str, float]:
    """{name: grad_norm(module.parameters())} for gradients already accumulated by a backward pass."""
    return {name: grad_norm(m.parameters()) for name, m in modules.items()}


# --- hooks on a megabranch Transformer ----------------------------------------------------------------------


def _stacks(model) -> dict[str, nn.ModuleList]:
    return {"encoder": model.encoder.layers, "decoder": model.decoder.layers}


class _Recorder:
    """Forward hooks that record each layer's input/output and each FFN's post-activation tensor."""

    def __init__(self, model):
        self.handles = []
        self.reps: dict[str, list] = {}
        self.acts: dict[str, list] = {}
        for stack, layers in _stacks(model).items():
            self.reps[stack] = [None] * (len(layers) + 1)
            self.acts[stack] = [None] * len(layers)
            for i, layer in enumerate(layers):
                if i == 0:
                    self.handles.append(layer.register_forward_pre_hook(self._input_hook(stack)))
                self.handles.append(layer.register_forward_hook(self._output_hook(stack, i + 1)))
                ffn = [m for m in layer.modules() if isinstance(m, FeedForward)]
                if ffn:
                    self.handles.append(ffn[0].fc1.register_forward_hook(self._act_hook(stack, i, ffn[0])))

    def _input_hook(self, stack):
        def hook(module, args):
            self.reps[stack][0] = args[0].detach()

        return hook

    def _output_hook(self, stack, i):
        def hook(module, args, out):
            self.reps[stack][i] = out.detach()

        return hook

    def _act_hook(self, stack, i, ffn):
        def hook(module, args, out):  # the activation's input: fc1's output (+ R-Fixup's scalar bias)
            h = out.detach() if ffn.pre_act_bias is None else out.detach() + ffn.pre_act_bias.detach()
            self.acts[stack][i] = ffn.act(h)

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def representation_stats(model, src_tokens: torch.Tensor, prev_output_tokens: torch.Tensor) -> dict:
    """-> {stack: {"cosine": [per layer], "ffn_nonzero": [per layer]}} from one eval-mode forward pass.

    cosine[i] = cos(input of layer i, output of layer i), token-averaged over non-pad tokens.
    """
    was_training = model.training
    model.eval()
    rec = _Recorder(model)
    try:
        model(src_tokens, prev_output_tokens)
    finally:
        rec.remove()
        model.train(was_training)
    masks = {"encoder": src_tokens.ne(PAD), "decoder": prev_output_tokens.ne(PAD)}
    out = {}
    for stack in ("encoder", "decoder"):
        m = masks[stack]
        out[stack] = {
            "cosine": adjacent_cosine(rec.reps[stack], m),
            "ffn_nonzero": [nonzero_fraction(a, m) for a in rec.acts[stack]],
        }
    return out


def layer_grad_norms(model, batch: dict, label_smoothing: float = 0.1) -> dict:
    """Per-layer gradient norms of the per-token training loss on `batch` (eval mode: no dropout).

    -> {"encoder": [...], "decoder": [...], "embed": norm of the shared/own embedding tables, "total": all}.
    Existing gradients are saved and restored, so this can run in the middle of training.
    """
    params = list({id(p): p for p in model.parameters()}.values())
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    was_training = model.training
    model.eval()
    try:
        logits = model(batch["src_tokens"], batch["prev_output_tokens"])
        loss, _ = label_smoothed_nll_loss(logits, batch["target"], label_smoothing)
        ntokens = int(batch.get("ntokens", batch["target"].ne(PAD).sum()))
        (loss / max(ntokens, 1)).backward()
        out = {stack: [grad_norm(layer.parameters()) for layer in layers] for stack, layers in _stacks(model).items()}
        tables = {id(m.table.weight): m.table.weight for m in (model.encoder.embed, model.decoder.embed)}
        out["embed"] = grad_norm(tables.values())
        out["total"] = grad_norm(params)
    finally:
        model.train(was_training)
        for p, g in zip(params, saved):
            p.grad = g
    return out


def analyze_model(model, batch: dict, label_smoothing: float = 0.1) -> dict:
    """All three measurements on one batch -> {stack: {"cosine", "ffn_nonzero", "grad_norm"}}."""
    stats = representation_stats(model, batch["src_tokens"], batch["prev_output_tokens"])
    grads = layer_grad_norms(model, batch, label_smoothing)
    for stack in ("encoder", "decoder"):
        stats[stack]["grad_norm"] = grads[stack]
    stats["grad_total"] = grads["total"]
    return stats


def analyze_batches(model, batches: list[dict], label_smoothing: float = 0.1) -> dict:
    """analyze_model over several batches: cosine and FFN density token-weighted over all of them, gradient
    norms from the first batch (the gradient of one batch's loss, as the paper's per-layer plots use)."""
    if not batches:
        raise ValueError("no batches to analyze")
    total = analyze_model(model, batches[0], label_smoothing)
    weights = {
        "encoder": [int(batches[0]["src_tokens"].ne(PAD).sum())],
        "decoder": [int(batches[0]["prev_output_tokens"].ne(PAD).sum())],
    }
    per_batch = [total]
    for b in batches[1:]:
        per_batch.append(representation_stats(model, b["src_tokens"], b["prev_output_tokens"]))
        weights["encoder"].append(int(b["src_tokens"].ne(PAD).sum()))
        weights["decoder"].append(int(b["prev_output_tokens"].ne(PAD).sum()))
    out = {"grad_total": total["grad_total"]}
    for stack in ("encoder", "decoder"):
        w = weights[stack]
        out[stack] = {"grad_norm": total[stack]["grad_norm"]}
        for key in ("cosine", "ffn_nonzero"):
            cols = zip(*(st[stack][key] for st in per_batch))
            out[stack][key] = [sum(v * wi for v, wi in zip(col, w)) / sum(w) for col in cols]
    return out


def analysis_rows(stats: dict, label: str = "") -> list[dict]:
    """Flatten analyze_model's result into CSV rows: label, stack, layer (1-based), cosine, ffn_nonzero, ..."""
    rows = []
    for stack in ("encoder", "decoder"):
        s = stats[stack]
        for i in range(len(s["cosine"])):
            nz = s["ffn_nonzero"][i]
            rows.append(
                {
                    "label": label,
                    "stack": stack,
                    "layer": i + 1,
                    "cosine": round(s["cosine"][i], 6),
                    "ffn_nonzero": round(nz, 6),
                    "ffn_sparsity": round(1.0 - nz, 6),
                    "grad_norm": "" if "grad_norm" not in s else float(f"{s['grad_norm'][i]:.6g}"),
                }
            )
    return rows


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)


def plot_analysis(results: dict[str, dict], path: str, title: str = "") -> None:
    """One PNG: rows = encoder/decoder, columns = cosine, FFN non-zero fraction, grad norm; one line per label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("cosine", "adjacent-layer cosine"), ("ffn_nonzero", "FFN non-zero fraction"), ("grad_norm", "grad norm")]
    keys = [k for k in keys if any(k[0] in r.get("encoder", {}) for r in results.values())]
    fig, axes = plt.subplots(2, len(keys), figsize=(3.6 * len(keys), 5.2), squeeze=False)
    for row, stack in enumerate(("encoder", "decoder")):
        for col, (key, name) in enumerate(keys):
            ax = axes[row][col]
            for label, stats in results.items():
                ys = stats[stack].get(key)
                if ys:
                    ax.plot(range(1, len(ys) + 1), ys, label=label, lw=1.2)
            if key == "grad_norm" and any(y > 0 for st in results.values() for y in st[stack].get(key) or []):
                ax.set_yscale("log")
            ax.set_title(f"{stack}: {name}", fontsize=9)
            ax.set_xlabel("layer", fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
