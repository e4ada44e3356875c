"""`megabranch-train`: build the engine a config asks for and run the one training loop over it.

    engine: training.single.Trainer            one process (the default)
            parallel.engine.ParallelTrainer    parallel.tp * parallel.pp > 1, or a torchrun launch (WORLD_SIZE > 1)
            backends.deepspeed.DeepSpeedTrainer  --backend deepspeed
    loop:   training.loop.train                data order, logging, validation, BLEU, checkpoints, stopping

Every engine starts from the same weights for a config seed (model.init.draw_init_seed) and writes the same
step-directory checkpoints (DeepSpeed: its own), which resume into any layout.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import yaml

from .backends.deepspeed import DeepSpeedTrainer, load_ds_config
from .backends.deepspeed import init_distributed as init_deepspeed_distributed
from .config import Config, load_config
from .data import load_split
from .dry_run import dry_run
from .errors import UserError, cli_main
from .generate import meta_vocab_hash
from .model import build_model, draw_init_seed
from .parallel.engine import ParallelTrainer
from .parallel.grid import init_distributed
from .training.loop import RunData, train
from .training.single import Trainer


def _parallel_requested(cfg: Config) -> bool:
    return cfg.parallel.tp * cfg.parallel.pp > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1


def build_engine(cfg: Config, vocab: int, tgt_vocab: int, vocab_sha256: str | None, device: str | None = None,
                 backend: str = "native", ds_config: dict | None = None):
    """The engine for `cfg` (joining the process group first where it needs one)."""
    if backend == "deepspeed":
        init_deepspeed_distributed()
        return DeepSpeedTrainer(cfg, vocab, tgt_vocab, ds_config)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # the init seed comes from cfg.seed alone, so every layout (tp, pp, dp) builds the same weights
    init_seed = draw_init_seed(cfg.seed)
    if _parallel_requested(cfg):
        if "RANK" not in os.environ:  # tp * pp > 1 asked for without a launcher
            raise UserError("parallel.tp * parallel.pp > 1 needs several processes: launch with torchrun --nproc_per_node N")
        init_distributed()
        return ParallelTrainer(cfg, vocab, tgt_vocab, dev, init_seed=init_seed, vocab_sha256=vocab_sha256)
    model = build_model(cfg.model, vocab, tgt_vocab, seed=init_seed)
    return Trainer(cfg, model, dev, vocab_sha256=vocab_sha256)


def run(cfg: Config, resume: str | None = None, device: str | None = None, backend: str = "native",
        ds_config: dict | None = None, on_step=None) -> dict:
    """Train according to `cfg`; returns the final validation stats. The programmatic entry point.
    resume: None (a fresh run), "last" (log.save_dir's latest checkpoint) or a checkpoint path.
    on_step(step stats) -> True stops the run after that step (training.loop.train)."""
    engine_cls = DeepSpeedTrainer if backend == "deepspeed" else Trainer
    if resume is None and engine_cls.has_checkpoints(cfg.log.save_dir):
        raise UserError(f"{cfg.log.save_dir} already holds checkpoints; pass --resume to continue it or set "
                        "log.save_dir elsewhere")
    train_set, tok, meta = load_split(cfg.data.data_dir, "train", cfg.data.sampling_temperature)
    valid_set, _, _ = load_split(cfg.data.data_dir, "valid")
    src_tok, tgt_tok = tok if isinstance(tok, tuple) else (tok, tok)
    engine = build_engine(cfg, src_tok.vocab_size, tgt_tok.vocab_size, meta_vocab_hash(meta), device, backend,
                          ds_config)
    loop_state = engine.resume(resume) if resume is not None else None
    return train(engine, cfg, RunData(train_set, valid_set, tgt_tok), loop_state, on_step=on_step)


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
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    ds = None
    if args.backend == "deepspeed":
        if not args.deepspeed_config:
            raise UserError("--backend deepspeed needs --deepspeed_config ds.json (examples in launch/configs/)")
        ds = load_ds_config(args.deepspeed_config, cfg)
    if args.dry_run:
        dry_run(cfg, args.world_size, args.backend, ds, args.vocab)
        return 0
    run(cfg, resume=args.resume, device=args.device, backend=args.backend, ds_config=ds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
