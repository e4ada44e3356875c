"""What megabranch-train's start-up costs in data: opening the train and valid splits (index checks, sizes, the
vocabulary check) and batching the first epoch, in seconds and in host memory (peak RSS), for one rank of a
data-parallel run. Run it on a directory megabranch-preprocess wrote, e.g. the synthetic WMT14 En-Fr-sized one:

    python -m tools.data.measure_startup --data tmp/wmt14_synthetic/bin --ranks 8

Peak RSS is the process's whole (Python, numpy and torch imported: the "imports" row says how much of it they are);
CPU seconds (this process's user + system time) next to wall seconds, which a loaded machine stretches.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time


def rss_mb() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MiB (ru_maxrss is in KiB on Linux)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a directory megabranch-preprocess wrote")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--ranks", type=int, default=1, help="data-parallel ranks (this process is rank 0)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)

    rows = []
    t0, c0 = time.perf_counter(), time.process_time()

    def row(what):
        nonlocal t0, c0
        now, peak = rss_mb()
        rows.append((what, time.perf_counter() - t0, time.process_time() - c0, now, peak))
        t0, c0 = time.perf_counter(), time.process_time()

    from megabranch.data import EpochBatchIterator, load_split

    row("imports (megabranch.data, numpy, torch)")
    train = load_split(args.data, "train")
    row("load_split train")
    load_split(args.data, "valid")
    row("load_split valid")
    itr = EpochBatchIterator(train.dataset, args.max_tokens, seed=args.seed, num_shards=args.ranks, shard_id=0)
    batches = itr.batches_for_epoch(1)
    row(f"batch epoch 1 ({len(batches)} batches of this rank)")
    first = next(itr.next_epoch_itr())
    row(f"first batch collated ({first['nsentences']} pairs)")
    print(f"{len(train.dataset)} training pairs, max_tokens {args.max_tokens}, {args.ranks} rank(s)")
    print("| step | wall s | CPU s | RSS after (MiB) | peak RSS so far (MiB) |\n|---|---|---|---|---|")
    for what, wall, cpu, now, peak in rows:
        print(f"| {what} | {wall:.2f} | {cpu:.2f} | {now:.0f} | {peak:.0f} |")
    wall, cpu = sum(r[1] for r in rows[1:]), sum(r[2] for r in rows[1:])
    print(f"start-up (all but the imports): {wall:.2f} s wall, {cpu:.2f} s CPU, peak RSS {rows[-1][4]:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
