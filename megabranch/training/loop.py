"""The run loop: one for every engine (training.protocol.Engine).

    train(engine, cfg, data) -> final validation stats

Data order (token batches, sharded over the data-parallel replicas, resumable), logging (log.jsonl, TensorBoard,
progress), validation every log.valid_interval steps with the sacreBLEU of a greedy/beam decode where the engine
has a whole model (per direction and averaged for a multilingual set; the native engine gathers one on rank 0
when the layout splits it and it fits: parallel/gather.py), a checkpoint after each validation, and stopping at
optim.max_updates (or when
`on_step` says so). Nothing here knows how an engine steps or saves.

Ending early (training/stopping.py): after every step the ranks agree whether any of them got SIGTERM / SIGUSR1
or passed --exit-duration-mins; if so they save one checkpoint of that step and raise RunEnded (exit code 75),
ignoring any further stop signal from then on (so a second SIGTERM cannot turn the exit 75 into a death). A
peer that stalls or dies ends the run with one line per surviving rank naming the step (parallel/failures.py).
log.jsonl gets a "start" record at the step each run starts from (metrics.read_log drops the replayed steps before
it) and a "stop" record when a run stops early.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

from ..config import Config
from ..data import EpochBatchIterator, pair_batches
from ..decoding import validation_bleu
from ..errors import EXIT_REQUEUE, RunEnded
from ..metrics import MetricsLogger, SilentLogger
from ..model.regional_compile import eager
from ..parallel.failures import comm_failure_ended, is_comm_failure
from .stopping import StopRequest


@dataclass
class RunData:
    """What a run reads: the train and valid splits and the target tokenizer (for BLEU)."""

    train_set: object
    valid_set: object
    tgt_tokenizer: object


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _interval_record(step: int, epoch: int, interval: dict, stats: dict, elapsed: float) -> dict:
    record = {
        "step": step,
        "epoch": epoch,
        "loss": _mean(interval["loss"]),
        "nll_loss": _mean(interval["nll_loss"]),
        "lr": stats["lr"],
        "alpha": stats["alpha"],
    }
    if interval["gnorm"]:  # every step of the interval was skipped (fp16 overflow): no norm to report
        record.update(gnorm=_mean(interval["gnorm"]), gnorm_max=max(interval["gnorm"]))
    record.update(skipped=interval["skipped"], tokens_per_s=round(interval["ntokens"] / max(elapsed, 1e-9), 1))
    return record


def _logs_at(step: int, log_interval: int, max_updates: int) -> bool:
    """Whether the interval record is written after `step`."""
    return step % log_interval == 0 or step == max_updates


def _new_interval() -> dict:
    return {"loss": [], "nll_loss": [], "gnorm": [], "ntokens": 0, "skipped": 0}


def _log_compile(logger, step: int, stats: dict) -> None:
    logger.log({"step": step, "compile_s": stats["compile_s"], "graphs": stats["graphs"]}, tag="compile")
    if stats["graphs"] == 0:
        print(
            "warning: model.compile=true, but the first step compiled no graph (torch.compile told to run eagerly, "
            "e.g. a force_eager stance?): the layers ran eagerly",
            file=sys.stderr,
        )


def train(
    engine,
    cfg: Config,
    data: RunData,
    loop_state: dict | None = None,
    valid_batches: list | None = None,
    on_step=None,
    save: bool = True,
    stop: StopRequest | None = None,
) -> dict:
    """Train `engine` until optim.max_updates -> the last validation stats ({} if it stopped before any).

    loop_state: what engine.resume() returned (data position, best validation loss). valid_batches: this rank's
    validation batches (default: the whole valid split in data.pair_batches). on_step(stats) -> True stops the
    run after that step (no validation or save for it). save=False writes no checkpoints. stop: when to end early
    (default: on SIGTERM / SIGUSR1), by raising RunEnded after saving; SIGTERM and SIGUSR1 then stay ignored in
    this process, which is expected to exit."""
    o, lg = cfg.optim, cfg.log
    itr = EpochBatchIterator(
        data.train_set,
        cfg.data.max_tokens,
        seed=cfg.seed,
        max_sentences=cfg.data.max_sentences or None,
        shuffle=cfg.data.shuffle,
        num_shards=engine.data_shards,
        shard_id=engine.data_shard,
    )
    best = math.inf
    if loop_state is not None:
        if loop_state.get("data") is not None:
            itr.load_state_dict(loop_state["data"])
        if loop_state.get("best_valid_loss") is not None:
            best = float(loop_state["best_valid_loss"])
    logger = (
        MetricsLogger(lg.save_dir, o.max_updates, lg.tensorboard, lg.progress) if engine.rank == 0 else SilentLogger()
    )
    if loop_state is None and engine.rank == 0:
        print(f"model: {engine.describe()}, {len(data.train_set)} training pairs", file=sys.stderr)
    if valid_batches is None:
        valid_batches = pair_batches(
            data.valid_set, cfg.data.max_tokens, shards=engine.data_shards, shard=engine.data_shard
        )
    groups = itr.update_groups(o.update_freq)
    interval = _new_interval()
    t0 = time.time()
    valid_stats: dict = {}
    stop = (stop or StopRequest()).install()
    logger.log({"step": engine.step, "resumed": loop_state is not None}, tag="start", echo=False)
    phase = "start"
    try:
        health = getattr(engine, "health", None)  # per-layer gradient norms (training/health.py)
        while engine.step < o.max_updates:
            phase = f"step {engine.step + 1}"
            if health is not None:  # the steps that are logged also measure their update-to-weight ratios
                health.measure_next = _logs_at(engine.step + 1, lg.log_interval, o.max_updates)
            stats = engine.train_step(next(groups))
            interval["loss"].append(stats["loss"])
            interval["nll_loss"].append(stats["nll_loss"])
            if math.isfinite(stats["gnorm"]):
                interval["gnorm"].append(stats["gnorm"])
            interval["ntokens"] += stats["ntokens"]
            interval["skipped"] += stats["skipped"]
            logger.progress(engine.step, stats["loss"], stats["alpha"])
            step = engine.step
            if "compile_s" in stats:  # model.compile: the first step compiled the layers
                _log_compile(logger, step, stats)
            last = step == o.max_updates
            if _logs_at(step, lg.log_interval, o.max_updates):
                logger.log(_interval_record(step, itr.epoch, interval, stats, time.time() - t0))
                if health is not None and (record := health.take_interval(step)) is not None:
                    logger.log_health(record)
                interval = _new_interval()
                t0 = time.time()
            if on_step is not None and on_step(stats):
                break
            saved = False
            if step % lg.valid_interval == 0 or last:
                phase = f"validation after step {step}"
                valid_stats = engine.valid_loss(valid_batches)
                model = engine.whole_model() if lg.bleu_sentences > 0 else None  # collective
                if model is not None:
                    with eager():  # compiled layers: the decoder's shapes change every token
                        valid_stats.update(
                            validation_bleu(
                                model,
                                data.valid_set,
                                data.tgt_tokenizer,
                                lg.bleu_beam,
                                lg.bleu_sentences,
                                next(model.parameters()).device,
                            )
                        )
                    del model
                logger.log({"step": step, **valid_stats}, tag="valid")
                is_best = valid_stats["loss"] < best
                best = min(best, valid_stats["loss"])
                if save:
                    phase = f"saving step {step}"
                    engine.save(lg.save_dir, itr.state_dict(), valid_stats["loss"], best, is_best)
                    saved = True
                t0 = time.time()  # validation and saving are not training throughput
            phase = f"the stop decision after step {step}"
            code = 0 if last else engine.max_over_ranks(stop.code())
            if code:
                stop.ending()  # more signals (scancel, then torchrun's forwarding) change nothing from here
                if interval["loss"]:  # the steps since the last record
                    logger.log(_interval_record(step, itr.epoch, interval, stats, time.time() - t0))
                phase = f"saving step {step}"
                if save and not saved:
                    engine.save(lg.save_dir, itr.state_dict(), None, best, False)
                engine.finish_saves()  # every checkpoint published before the run ends
                raise _stopped(engine, cfg, step, stop.reason(code), save, logger)
        phase = "the last save"
        engine.finish_saves()  # a background save still in flight is published before the run returns
    except BaseException as e:
        if isinstance(e, Exception) and is_comm_failure(e):
            raise comm_failure_ended(e, phase, cfg.parallel.timeout_s) from None
        _publish_in_flight(engine)  # an error or Ctrl-C mid-run: the checkpoint already being written still lands
        raise
    finally:
        stop.uninstall()
        logger.close()
    return valid_stats


def _publish_in_flight(engine) -> None:
    """Wait for a background save before an exception leaves the loop (the caller may remove or reuse the
    directory, and a daemon writer dies with the process); its own failure is said, not raised over the first."""
    try:
        engine.finish_saves()
    except Exception as err:
        print(f"warning: the checkpoint being written when the run failed was not published: {err}", file=sys.stderr)


def _stopped(engine, cfg: Config, step: int, reason: str, saved: bool, logger) -> RunEnded:
    """The early end after `step`: a "stop" record, and the one line rank 0 prints (exit code 75)."""
    logger.log({"step": step, "reason": reason}, tag="stop", echo=False)
    if engine.rank != 0:
        return RunEnded("", EXIT_REQUEUE)
    where = f"saved a checkpoint of it in {cfg.log.save_dir}" if saved else "no checkpoint (saving is off)"
    return RunEnded(
        f"stopped after step {step} {reason}: {where}; run the same command with --resume auto to continue",
        EXIT_REQUEUE,
    )
