"""`megabranch-train`: the training loop.

One optimizer step, top to bottom (Trainer.train_step):
  1. alpha: every stack's coefficient buffer is set from the global step t (megabranch.residual.set_step);
  2. forward/backward of `update_freq` batches, each loss divided by the step's total target tokens;
  3. gradient norm (clipped when optim.clip_norm > 0); a non-finite norm skips the update;
  4. AdamW update with the inverse-sqrt learning rate of step t; t += 1.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time

import torch

from . import checkpoint
from .config import Config, load_config
from .errors import UserError, cli_main
from .metrics import MetricsLogger
from .model import build_model, count_parameters, label_smoothed_nll_loss
from .residual import current_alpha, set_step


def inverse_sqrt_lr(step: int, cfg) -> float:
    """fairseq's inverse_sqrt: linear warmup from warmup_init_lr to lr, then lr * sqrt(warmup / step)."""
    warmup = cfg.warmup_updates
    if warmup > 0 and step < warmup:
        return cfg.warmup_init_lr + (cfg.lr - cfg.warmup_init_lr) * step / warmup
    return cfg.lr * math.sqrt(max(warmup, 1) / max(step, 1))


class Trainer:
    """Owns the model, the optimizer and the global step; knows nothing about where batches come from."""

    def __init__(self, cfg: Config, model: torch.nn.Module, device: torch.device):
        self.cfg, self.model, self.device = cfg, model.to(device), device
        o = cfg.optim
        params = list({id(p): p for p in model.parameters()}.values())
        self.optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.adam_eps, weight_decay=o.weight_decay)
        self.step = 0
        if o.precision == "fp16" and device.type != "cuda":
            raise UserError("optim.precision=fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
        self.scaler = torch.amp.GradScaler("cuda") if o.precision == "fp16" else None
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(o.precision)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _loss(self, batch):
        with self.autocast():
            logits = self.model(batch["src_tokens"].to(self.device), batch["prev_output_tokens"].to(self.device))
        return label_smoothed_nll_loss(logits, batch["target"].to(self.device), self.cfg.optim.label_smoothing)

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
        return {
            "loss": loss_sum / ntokens,
            "nll_loss": nll_sum / ntokens,
            "lr": lr,
            "alpha": alpha,
            "gnorm": gnorm,
            "ntokens": ntokens,
            "skipped": int(skipped),
        }

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


def rng_state() -> dict:
    from .parallel.tensor_parallel import get_rng_tracker

    state = {"torch": torch.get_rng_state(), "tracker": get_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("tracker"):
        from .parallel.tensor_parallel import get_rng_tracker

        get_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _check_model_matches(cfg: Config, saved: dict, path: str) -> None:
    ours, theirs = cfg.to_dict()["model"], saved["model"]
    for key in sorted(set(ours) | set(theirs)):
        if key in ("dropout", "attention_dropout", "activation_dropout", "fused_kernels"):
            continue  # regularisation and kernel choice may change across a resume
        if ours.get(key) != theirs.get(key):
            raise UserError(f"--resume: model.{key}={ours.get(key)!r} but {path} was trained with {theirs.get(key)!r}")


def run(cfg: Config, resume: str | None = None, device: str | None = None) -> dict:
    """Train according to `cfg`; returns the final validation stats. The programmatic entry point."""
    from .data import EpochBatchIterator, load_split
    from .generate import meta_vocab_hash, quick_bleu

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    save_dir = cfg.log.save_dir
    # tp * pp > 1 or a torchrun launch: the parallel engine; checkpoints are step_<N>/ directories with one shard
    # per (tp, pp) position (megabranch.checkpoint), whatever the engine
    parallel = cfg.parallel.tp * cfg.parallel.pp > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank = _init_parallel() if parallel else 0
    if resume is None and checkpoint.has_checkpoints(save_dir):
        raise UserError(f"{save_dir} already holds checkpoints; pass --resume to continue it or set log.save_dir elsewhere")
    step_dir = meta_in = None
    if resume is not None:  # "last": <save_dir>/latest; else a step directory, a save directory or a pointer file
        step_dir = checkpoint.resolve(save_dir if resume in ("", "last") else resume, "latest")
        meta_in = checkpoint.read_meta(step_dir)

    train_set, tok, meta = load_split(cfg.data.data_dir, "train")
    valid_set, _, _ = load_split(cfg.data.data_dir, "valid")
    src_tok, tgt_tok = tok if isinstance(tok, tuple) else (tok, tok)
    vocab_hash = meta_vocab_hash(meta)
    if meta_in is not None:
        if meta_in.get("vocab_sha256") is None:  # imported (torchscale, DeepSpeed): only the sizes are known
            if meta_in.get("vocab_size") != src_tok.vocab_size:
                raise UserError(f"--resume: {step_dir} has a vocabulary of {meta_in.get('vocab_size')} entries, "
                                f"{cfg.data.data_dir} one of {src_tok.vocab_size}")
        elif meta_in.get("vocab_sha256") != vocab_hash:
            raise UserError(f"--resume: the vocabulary of {cfg.data.data_dir} differs from the one {step_dir} was "
                            "trained with; use the data it was trained on")
        _check_model_matches(cfg, meta_in["config"], step_dir)

    from .parallel.engine import ParallelTrainer, draw_init_seed

    # the init seed comes from cfg.seed alone, so every layout (tp, pp, dp) builds the same weights
    init_seed = draw_init_seed(cfg.seed)
    if parallel:
        trainer = ParallelTrainer(cfg, src_tok.vocab_size, tgt_tok.vocab_size, dev, init_seed=init_seed)
        model, shards, shard_id = trainer.model, trainer.grid.dp, trainer.grid.dp_rank
    else:
        model = build_model(cfg.model, src_tok.vocab_size, tgt_tok.vocab_size, seed=init_seed)
        trainer, shards, shard_id = Trainer(cfg, model, dev), 1, 0
    itr = EpochBatchIterator(train_set, cfg.data.max_tokens, seed=cfg.seed, max_sentences=cfg.data.max_sentences or None,
                             shuffle=cfg.data.shuffle, num_shards=shards, shard_id=shard_id)
    best = float("inf")
    state = None
    if meta_in is not None:
        state = checkpoint.load_for_rank(step_dir, meta_in, trainer.position(), trainer.named_params())
        trainer.load_checkpoint_state(state)
        if state["data"] is not None:
            itr.load_state_dict(state["data"])
        if state["rng"] is not None:
            set_rng_state(state["rng"])
        if meta_in.get("best_valid_loss") is not None:
            best = float(meta_in["best_valid_loss"])
        if rank == 0 and state["optimizer"] is None and state["zero"] is None:
            print(f"{step_dir} holds no optimizer state (averaged, imported or converted without it): "
                  "Adam starts fresh", file=sys.stderr)
        if rank == 0 and state["resharded"]:
            print(f"resumed from {step_dir} (layout {meta_in['layout']}), resharded for this layout", file=sys.stderr)

    o, lg = cfg.optim, cfg.log
    logger = MetricsLogger(save_dir, o.max_updates, lg.tensorboard, lg.progress) if rank == 0 else _SilentLogger()
    if state is None and rank == 0:
        where = f"{trainer.grid.describe()}, stages {trainer.layout}" if parallel else f"{count_parameters(model) / 1e6:.2f}M parameters"
        print(f"model: {cfg.model.residual} {cfg.model.encoder_layers}L-{cfg.model.decoder_layers}L d={cfg.model.d_model}, "
              f"{where}, {len(train_set)} training pairs, device {dev}", file=sys.stderr)
    valid_batches = list(EpochBatchIterator(valid_set, cfg.data.max_tokens, seed=cfg.seed, shuffle=False).next_epoch_itr())
    valid_batches = valid_batches[shard_id::shards]
    groups = itr.update_groups(o.update_freq)
    interval: dict = {}
    t0 = time.time()
    valid_stats: dict = {}
    while trainer.step < o.max_updates:
        stats = trainer.train_step(next(groups))
        for k in ("loss", "nll_loss", "gnorm"):
            interval.setdefault(k, []).append(stats[k])
        interval["ntokens"] = interval.get("ntokens", 0) + stats["ntokens"]
        interval["skipped"] = interval.get("skipped", 0) + stats["skipped"]
        logger.progress(trainer.step, stats["loss"], stats["alpha"])
        step = trainer.step
        if step % lg.log_interval == 0 or step == o.max_updates:
            elapsed = time.time() - t0
            logger.log({
                "step": step, "epoch": itr.epoch,
                "loss": _mean(interval["loss"]), "nll_loss": _mean(interval["nll_loss"]),
                "lr": stats["lr"], "alpha": stats["alpha"], "gnorm": _mean(interval["gnorm"]),
                "gnorm_max": max(interval["gnorm"]), "skipped": interval["skipped"],
                "tokens_per_s": round(interval["ntokens"] / max(elapsed, 1e-9), 1),
            })
            interval, t0 = {}, time.time()
        if step % lg.valid_interval == 0 or step == o.max_updates:
            valid_stats = trainer.valid_loss(valid_batches)
            if lg.bleu_sentences > 0 and not parallel:  # decoding needs the whole model on one process
                valid_stats["bleu"] = quick_bleu(trainer.model, valid_set, tgt_tok, lg.bleu_beam, lg.bleu_sentences, dev)
            logger.log({"step": step, **valid_stats}, tag="valid")
            is_best = valid_stats["loss"] < best
            best = min(best, valid_stats["loss"])
            pos = trainer.position()
            meta_out = {
                "layout": {k: pos[k] for k in ("tp", "pp", "vpp", "dp", "layout", "zero")},
                "config": cfg.to_dict(), "vocab_sha256": vocab_hash, "vocab_size": src_tok.vocab_size,
                "tgt_vocab_size": tgt_tok.vocab_size, "valid_loss": valid_stats["loss"],
                "best_valid_loss": best if math.isfinite(best) else None,
                "alpha": {"value": current_alpha(trainer.model), "schedule": cfg.model.alpha_schedule,
                          "warmup_steps": cfg.model.alpha_warmup_steps, "step": step},
            }
            checkpoint.save_step(save_dir, step, _checkpoint_files(trainer, itr), meta_out, is_best, lg.keep_last)
            t0 = time.time()  # validation and saving are not training throughput
    logger.close()
    return valid_stats


def _mean(xs):
    return sum(xs) / len(xs)


def _checkpoint_files(trainer, itr) -> dict:
    """This rank's files of a step directory: data-parallel rank 0 of a (tp, pp) position writes the shard
    (parameters, optimizer, step, alpha, its RNG / data position); the other replicas their RNG, data position
    and ZeRO-1 optimizer slice."""
    pos = trainer.position()
    zero = checkpoint.is_zero(trainer.optimizer)
    mine = {"rng": rng_state(), "data": itr.state_dict(), "zero": trainer.optimizer.state_dict() if zero else None}
    t, p, d = pos["tp_rank"], pos["pp_rank"], pos["dp_rank"]
    if d > 0:
        return {checkpoint.shard_name(t, p, d): {"rank": mine, "step": trainer.step}}
    params = trainer.named_params()
    scaler = getattr(trainer, "scaler", None)
    return {checkpoint.shard_name(t, p): {
        "model": {k: v.detach().clone() for k, v in params.items()},
        "split": checkpoint.split_info(params),
        "optimizer": checkpoint.optimizer_to_canonical(trainer.optimizer, list(params)),
        "scaler": scaler.state_dict() if scaler else {},
        "step": trainer.step,
        "alpha": current_alpha(trainer.model),
        "rank": mine,
    }}


def _init_parallel() -> int:
    from .parallel.grid import init_distributed

    if "RANK" not in os.environ:  # tp * pp > 1 asked for without a launcher
        raise UserError("parallel.tp * parallel.pp > 1 needs several processes: launch with torchrun --nproc_per_node N")
    init_distributed()
    return torch.distributed.get_rank()


class _SilentLogger:
    """What ranks other than global rank 0 log: nothing."""

    def log(self, record: dict, tag: str = "train") -> None:
        pass

    def progress(self, step: int, loss: float, alpha: float) -> None:
        pass

    def close(self) -> None:
        pass


@cli_main
def main(argv=None):
    ap = argparse.ArgumentParser(prog="megabranch-train", description="Train a deep encoder-decoder Transformer.")
    ap.add_argument("--config", help="YAML or JSON config (see configs/)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. model.encoder_layers=12")
    ap.add_argument("--resume", nargs="?", const="last",
                    help="continue from <save_dir>/latest, or the given step_<N> directory (any parallel layout)")
    ap.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    ap.add_argument("--backend", choices=("native", "deepspeed"), default="native",
                    help="native (megabranch's engines) or deepspeed (a DeepSpeed PipelineModule; needs --deepspeed_config)")
    ap.add_argument("--deepspeed_config", "--deepspeed-config", help="DeepSpeed JSON config (see launch/configs/)")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the stage layout, parameters per stage, memory plan and effective batch, then exit")
    ap.add_argument("--world-size", type=int, help="--dry-run: processes (default $WORLD_SIZE, else tp * pp)")
    ap.add_argument("--vocab", type=int, help="--dry-run: vocabulary size when data.data_dir has no meta.json")
    ap.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.set)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    if args.backend == "deepspeed" and not args.deepspeed_config:
        raise UserError("--backend deepspeed needs --deepspeed_config ds.json (examples in launch/configs/)")
    if args.dry_run:
        from .parallel.memory import dry_run

        ds = None
        if args.backend == "deepspeed":
            from .backends.deepspeed import load_ds_config

            ds = load_ds_config(args.deepspeed_config, cfg)
        dry_run(cfg, args.world_size, args.backend, ds, args.vocab)
        return 0
    if args.backend == "deepspeed":
        from .backends.deepspeed import run as run_deepspeed

        run_deepspeed(cfg, args.deepspeed_config, resume=args.resume)
        return 0
    run(cfg, resume=args.resume, device=args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
