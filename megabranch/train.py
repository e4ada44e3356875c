"""`megabranch-train`: build the engine a config asks for and run the one training loop over it.

    engine: training.engine.Trainer            the native engine: one process, or tp x pp x dp under torchrun
            backends.deepspeed.DeepSpeedTrainer  --backend deepspeed
    loop:   training.loop.train                data order, logging, validation, BLEU, checkpoints, stopping

Every engine starts from the same weights for a config seed (model.init.draw_init_seed) and writes the same
step-directory checkpoints (DeepSpeed: its own), which resume into any layout.

Around the loop: the process group is joined with parallel.timeout_s, then log.save_dir is locked for the run's
life (one writer; checkpoint/lock.py), then `--resume auto` picks the latest checkpoint when there is one. Exit
codes: errors.py (0 done, 1 a peer failed, 2 bad input, 75 stopped after a checkpoint).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import yaml

from . import checkpoint
from .backends.deepspeed import DeepSpeedTrainer, load_ds_config
from .backends.deepspeed import init_distributed as init_deepspeed_distributed
from .config import POSITIVE, Config, load_config
from .data import load_split
from .device import resolve_device
from .dry_run import dry_run, resolve_world_size
from .errors import UserError, cli_main
from .generate import meta_vocab_hash
from .parallel.failures import comm_failure_ended, is_comm_failure
from .parallel.grid import init_distributed
from .planning.schedule_choice import GiB, resolve
from .rehearse import rehearse
from .training.engine import Trainer
from .training.loop import RunData, train
from .training.stopping import StopRequest


def _parallel_requested(cfg: Config) -> bool:
    return cfg.parallel.tp * cfg.parallel.pp > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1


def join_process_group(cfg: Config, backend: str = "native") -> None:
    """Join the job's process group (collective; nothing to do for one process), every wait bounded by
    parallel.timeout_s."""
    if backend == "deepspeed":
        init_deepspeed_distributed(cfg.parallel.timeout_s)
    elif _parallel_requested(cfg):
        if "RANK" not in os.environ:  # tp * pp > 1 asked for without a launcher
            raise UserError(
                "parallel.tp * parallel.pp > 1 needs several processes: launch with torchrun --nproc_per_node N"
            )
        init_distributed(timeout_s=cfg.parallel.timeout_s)


def build_engine(
    cfg: Config,
    vocab: int,
    tgt_vocab: int,
    vocab_sha256: str | None,
    device: str | torch.device | None = None,
    backend: str = "native",
    ds_config: dict | None = None,
):
    """The engine for `cfg` (joining the process group first where it needs one); device: as --device."""
    join_process_group(cfg, backend)
    if backend == "deepspeed":
        return DeepSpeedTrainer(cfg, vocab, tgt_vocab, ds_config)
    # the init seed comes from cfg.seed alone (Trainer draws it), so every layout builds the same weights
    return Trainer(cfg, vocab, tgt_vocab, resolve_device(device), vocab_sha256=vocab_sha256)


def plan_schedule(
    cfg: Config,
    vocab: int,
    tgt_vocab: int,
    backend: str = "native",
    device: str | None = None,
    gpu_memory_gb: float | None = None,
) -> Config:
    """The config to train with: parallel.schedule=auto decided by planning/schedule_choice.py (the same decision
    --dry-run prints), an explicit schedule checked against gpu_memory_gb when it is given. Without
    gpu_memory_gb, auto plans for this machine's GPU (else planning.DEFAULT_GPU_GB)."""
    if backend == "deepspeed":
        if cfg.parallel.schedule == "auto":
            raise UserError(
                "parallel.schedule=auto plans the native engine's schedules; --backend deepspeed runs "
                "DeepSpeed's own 1F1B: set parallel.schedule=1f1b"
            )
        return cfg
    if (
        gpu_memory_gb is None
        and cfg.parallel.schedule == "auto"
        and torch.cuda.is_available()
        and str(device or "cuda").startswith("cuda")
    ):
        gpu_memory_gb = torch.cuda.get_device_properties(torch.device(device or "cuda")).total_memory / GiB
    _, dp = resolve_world_size(cfg)
    return resolve(cfg, vocab, tgt_vocab, dp, gpu_memory_gb).cfg


def _resume_choice(resume: str | None, has_checkpoints: bool, save_dir: str) -> str | None:
    """--resume auto -> "last" when save_dir holds checkpoints, else a fresh start (None)."""
    if resume == "auto":
        return "last" if has_checkpoints else None
    if resume is None and has_checkpoints:
        raise UserError(
            f"{save_dir} already holds checkpoints; pass --resume (or --resume auto) to continue it or "
            "set log.save_dir elsewhere"
        )
    return resume


def run(
    cfg: Config,
    resume: str | None = None,
    device: str | None = None,
    backend: str = "native",
    ds_config: dict | None = None,
    gpu_memory_gb: float | None = None,
    exit_duration_mins: float | None = None,
    started: float | None = None,
    on_step=None,
) -> dict:
    """Train according to `cfg`; returns the final validation stats. The programmatic entry point.
    resume: None (a fresh run), "auto" (log.save_dir's latest checkpoint when it has one, else a fresh run),
    "last" (log.save_dir's latest) or a checkpoint path. exit_duration_mins: once that many minutes have passed
    since `started` (default: now), save and stop. Stopping early (that, SIGTERM, SIGUSR1) raises RunEnded with
    exit code 75, after the checkpoint; a stalled or dead peer RunEnded with exit code 1. on_step(step stats) -> True
    stops the run after that step (training.loop.train)."""
    device = resolve_device(device)  # before anything is started or written
    stop = StopRequest(exit_duration_mins, started)
    engine_cls = DeepSpeedTrainer if backend == "deepspeed" else Trainer
    try:
        join_process_group(cfg, backend)
        with checkpoint.one_writer(cfg.log.save_dir):
            resume = _resume_choice(resume, engine_cls.has_checkpoints(cfg.log.save_dir), cfg.log.save_dir)
            data = load_split(cfg.data.data_dir, "train", cfg.data.sampling_temperature)
            valid = load_split(cfg.data.data_dir, "valid")
            src_v, tgt_v = data.src_tok.vocab_size, data.tgt_tok.vocab_size
            cfg = plan_schedule(cfg, src_v, tgt_v, backend, device, gpu_memory_gb)
            engine = build_engine(cfg, src_v, tgt_v, meta_vocab_hash(data.meta), device, backend, ds_config)
            loop_state = engine.resume(resume) if resume is not None else None
            return train(
                engine, cfg, RunData(data.dataset, valid.dataset, data.tgt_tok), loop_state, stop=stop, on_step=on_step
            )
    except Exception as e:
        if is_comm_failure(e):  # (the loop names the step of its own failures)
            raise comm_failure_ended(e, "start-up", cfg.parallel.timeout_s) from None
        raise


@cli_main
def main(argv=None):
    ap = argparse.ArgumentParser(prog="megabranch-train", description="Train a deep encoder-decoder Transformer.")
    ap.add_argument("--config", help="YAML or JSON config (see configs/)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. model.encoder_layers=12",
    )
    ap.add_argument(
        "--resume",
        nargs="?",
        const="last",
        help="continue from <save_dir>/latest, or the given step_<N> directory (any parallel layout); "
        "'auto': from <save_dir>/latest when there is one, else start fresh (for restarts and "
        "requeues)",
    )
    ap.add_argument(
        "--exit-duration-mins",
        type=float,
        metavar="MINUTES",
        help="save a checkpoint and stop (exit code 75) once this many minutes have passed since the "
        "start, before a scheduler's wall-clock limit",
    )
    ap.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    ap.add_argument(
        "--backend",
        choices=("native", "deepspeed"),
        default="native",
        help="native (megabranch's engines) or deepspeed (a DeepSpeed PipelineModule; needs --deepspeed_config)",
    )
    ap.add_argument("--deepspeed_config", "--deepspeed-config", help="DeepSpeed JSON config (see launch/configs/)")
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="print the stage layout, parameters per stage, memory plan and effective batch, then exit",
    )
    ap.add_argument(
        "--rehearse",
        action="store_true",
        help="build every rank's stage at full size on fake tensors over a fake world of --world-size "
        "ranks and run one training step of its own schedule on this CPU: memory by kind, FLOPs, "
        "device-to-host reads and a roofline prediction per rank beside the plan, then exit",
    )
    ap.add_argument(
        "--ranks", metavar="R,R,...", help="--rehearse: the global ranks to rehearse (default: one per pipeline stage)"
    )
    ap.add_argument("--gpu", default="H100", help="--rehearse: the GPU the roofline prices for (A100 or H100)")
    ap.add_argument(
        "--world-size", type=int, help="--dry-run / --rehearse: processes (default $WORLD_SIZE, else tp * pp)"
    )
    ap.add_argument(
        "--vocab", type=int, help="--dry-run / --rehearse: vocabulary size when data.data_dir has no meta.json"
    )
    ap.add_argument(
        "--gpu-memory-gb",
        type=float,
        help="GiB per GPU that parallel.schedule=auto plans for (default: this GPU's, else 80) and "
        "that an explicit schedule is checked against",
    )
    ap.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = ap.parse_args(argv)
    started = time.time()
    POSITIVE.check_flag("--exit-duration-mins", args.exit_duration_mins, " (minutes)")
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
        dry_run(cfg, args.world_size, args.backend, ds, args.vocab, gpu_memory_gb=args.gpu_memory_gb)
    if args.ranks is not None and not args.rehearse:
        raise UserError("--ranks chooses the ranks --rehearse rehearses: add --rehearse")
    if args.rehearse:
        if args.backend != "native":
            raise UserError("--rehearse runs the native engine (--backend native)")
        rehearse(cfg, args.world_size, args.ranks, args.gpu, args.vocab, gpu_memory_gb=args.gpu_memory_gb)
    if args.dry_run or args.rehearse:
        return 0
    run(
        cfg,
        resume=args.resume,
        device=args.device,
        backend=args.backend,
        ds_config=ds,
        gpu_memory_gb=args.gpu_memory_gb,
        exit_duration_mins=args.exit_duration_mins,
        started=started,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
