"""torchrun for megabranch's workers, as launch/*.sh start it: torchrun's own arguments and behaviour, except that
when every worker of this node stopped to be requeued (it saved a checkpoint on SIGTERM / SIGUSR1, which torchrun
forwards, or at --exit-duration-mins, and exited 75) this exits 75 with one line, where torchrun would print a
traceback and exit 1 (it reports any worker that exits non-zero, and its own SIGTERM, as a failure). A scheduler
that requeues on 75 (launch/slurm.sbatch) then continues the run.

    python launch/torchrun.py [torchrun options] -m megabranch.train ...

The workers say they stopped through files in a directory made here ($MEGABRANCH_STOPPED_DIR;
megabranch.errors.note_stopped). Every other outcome is torchrun's: its exit code, its report.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record

from megabranch.errors import EXIT_REQUEUE, STOPPED_DIR_ENV


def all_stopped(where: str) -> int:
    """How many workers of this node stopped to be requeued, when that is all of them (else 0)."""
    counts = []
    for name in os.listdir(where):
        with open(os.path.join(where, name)) as fh:
            counts.append(int(fh.read().strip() or 0))
    return len(counts) if counts and all(c == len(counts) for c in counts) else 0


@record
def main(argv=None) -> int:
    where = tempfile.mkdtemp(prefix="megabranch-stopped-")
    os.environ[STOPPED_DIR_ENV] = where  # the workers inherit it
    try:
        try:
            torchrun.run(torchrun.parse_args(argv))
        except (SignalException, ChildFailedError):
            n = all_stopped(where)
            if not n:
                raise
            print(
                f"# torchrun: all {n} workers saved a checkpoint and stopped: exit code {EXIT_REQUEUE} (run the "
                "same command to continue)",
                file=sys.stderr,
            )
            return EXIT_REQUEUE
    finally:
        shutil.rmtree(where, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
