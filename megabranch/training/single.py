"""`Trainer`: the single-process engine (training.protocol.Engine).

One optimizer step, top to bottom (Trainer.train_step):
  1. alpha: every stack's coefficient buffer is set from the global step t (megabranch.residual.set_step);
  2. forward/backward of `update_freq` batches, each loss divided by the step's total target tokens;
  3. gradient norm (clipped when optim.clip_norm > 0); a non-finite norm skips the update;
  4. AdamW update with the inverse-sqrt learning rate of step t; t += 1.
With model.compile, every encoder / decoder layer is compiled (model/regional_compile.py); the first step's stats
carry its time (compile_s) and the number of graphs compiled.
"""

from __future__ import annotations

import contextlib
import math

import torch

from .. import checkpoint
from ..config import Config
from ..errors import UserError
from ..model import count_parameters, label_smoothed_nll_loss
from ..model.regional_compile import FirstStepTimer, compile_layers
from ..residual import current_alpha, set_step
from . import native_checkpoint
from .lr_schedule import inverse_sqrt_lr
from .protocol import step_stats


class Trainer(native_checkpoint.NativeCheckpointing):
    """Owns the model, the optimizer and the global step; knows nothing about where batches come from."""

    rank, data_shards, data_shard = 0, 1, 0

    def __init__(self, cfg: Config, model: torch.nn.Module, device: torch.device, vocab_sha256: str | None = None):
        self.cfg, self.model, self.device = cfg, model.to(device), device
        self.vocab_sha256 = vocab_sha256
        self.vocab_sizes = (model.encoder.embed.table.num_embeddings, model.decoder.embed.table.num_embeddings)
        o = cfg.optim
        params = list({id(p): p for p in model.parameters()}.values())
        self.optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.adam_eps, weight_decay=o.weight_decay)
        self.step = 0
        if o.precision == "fp16" and device.type != "cuda":
            raise UserError("optim.precision=fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
        self.scaler = torch.amp.GradScaler("cuda") if o.precision == "fp16" else None
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(o.precision)
        m = cfg.model
        if m.compile:
            compile_layers(self.model, m.compile_backend, device, m.fused_kernels)
        self.first_step = FirstStepTimer(m.compile)

    def describe(self) -> str:
        m = self.cfg.model
        return (f"{m.residual} {m.encoder_layers}L-{m.decoder_layers}L d={m.d_model}, "
                f"{count_parameters(self.model) / 1e6:.2f}M parameters, device {self.device}")

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _loss(self, batch):
        with self.autocast():
            logits = self.model(batch["src_tokens"].to(self.device), batch["prev_output_tokens"].to(self.device))
        return label_smoothed_nll_loss(logits, batch["target"].to(self.device), self.cfg.optim.label_smoothing)

    def alpha(self) -> float:
        return current_alpha(self.model)

    def train_step(self, batches: list[dict]) -> dict:
        o = self.cfg.optim
        self.model.train()
        set_step(self.model, self.step)
        alpha = current_alpha(self.model)
        lr = inverse_sqrt_lr(self.step, o)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        ntokens = sum(int(b["ntokens"]) for b in batches)
        loss_sum = nll_sum = 0.0
        with self.first_step.first_step():
            for batch in batches:
                loss, nll = self._loss(batch)
                scaled = loss / ntokens
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
                loss_sum += float(loss.detach())
                nll_sum += float(nll.detach())
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        max_norm = o.clip_norm if o.clip_norm > 0 else float("inf")
        gnorm = float(torch.nn.utils.clip_grad_norm_(self.optimizer.param_groups[0]["params"], max_norm))
        skipped = not math.isfinite(gnorm)
        if self.scaler:
            self.scaler.step(self.optimizer)  # skips by itself on inf/nan
            self.scaler.update()
        elif not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {**step_stats(loss_sum, nll_sum, ntokens, lr, alpha, gnorm, skipped), **self.first_step.take()}

    @torch.no_grad()
    def valid_loss(self, batches) -> dict:
        self.model.eval()
        set_step(self.model, self.step)  # the alpha the next update would use, as the parallel engine does
        loss_sum = nll_sum = 0.0
        ntokens = 0
        for batch in batches:
            loss, nll = self._loss(batch)
            loss_sum, nll_sum, ntokens = loss_sum + float(loss), nll_sum + float(nll), ntokens + int(batch["ntokens"])
        return {"loss": loss_sum / max(ntokens, 1), "nll_loss": nll_sum / max(ntokens, 1)}

    def max_over_ranks(self, value: int) -> int:
        return int(value)

    def bleu_model(self):
        return self.model

    # --- checkpoints (training.native_checkpoint) ---------------------------------------------------------------
    def named_params(self) -> dict:
        """Parameters by single-process name, each object once (a shared table under its first name)."""
        return dict(self.model.named_parameters())

    def position(self) -> dict:
        """Where this trainer sits in a process grid, as megabranch.checkpoint.load_for_rank reads it."""
        return dict(checkpoint.single_layout(), tp_rank=0, pp_rank=0, dp_rank=0)

    @torch.no_grad()
    def load_checkpoint_state(self, state: dict) -> None:
        """Restore from megabranch.checkpoint.load_for_rank's result."""
        checkpoint.restore(self.named_params(), self.optimizer, state)
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        set_step(self.model, self.step)
