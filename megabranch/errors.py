"""User errors and the other ways a run ends early: one line, a definite exit code, no traceback.

Exit codes of the command-line tools:

    0   done
    1   failed: a peer rank stalled or died (one line per surviving rank), or a bug (a traceback)
    2   bad input: a file, a config value, an argument, a checkpoint, an unusable save_dir or device; checkpoint
        saves that keep failing (a full disk: log.max_failed_saves) (UserError)
    75  stopped on purpose after saving a checkpoint (SIGTERM, SIGUSR1, --exit-duration-mins): run the same
        command with --resume auto to continue. 75 is EX_TEMPFAIL of sysexits.h ("try again later").

torchrun reports any worker that exits non-zero as a failure (a traceback, exit code 1). So a worker that exits
75 also leaves a file named after its local rank in $MEGABRANCH_STOPPED_DIR when that is set (launch/torchrun.py
sets it), and the launcher, finding every worker's, exits 75 itself.
"""

from __future__ import annotations

import functools
import os
import sys

EXIT_FAILED = 1
EXIT_USER_ERROR = 2
EXIT_REQUEUE = 75
STOPPED_DIR_ENV = "MEGABRANCH_STOPPED_DIR"


class UserError(Exception):
    """A mistake in the user's input (file, config, checkpoint); printed as one line, never as a traceback."""


class RunEnded(Exception):
    """A run that ends before its last step on purpose (a signal, a wall-clock limit: exit_code 75) or because a
    peer failed (exit_code 1). The message is printed as one line (nothing when it is empty: the ranks that are
    not the one reporting). `abrupt`: leave without interpreter teardown, which would wait on (or abort in) a
    process group whose peer is gone."""

    def __init__(self, message: str, exit_code: int, abrupt: bool = False):
        super().__init__(message)
        self.exit_code, self.abrupt = exit_code, abrupt


def note_stopped() -> None:
    """Leave this worker's file in $MEGABRANCH_STOPPED_DIR (if set): it stops to be requeued. Its content is the
    node's worker count, so the launcher knows when it has all of them."""
    where = os.environ.get(STOPPED_DIR_ENV)
    if not where:
        return
    try:
        with open(os.path.join(where, f"local_rank_{os.environ.get('LOCAL_RANK', '0')}"), "w") as fh:
            fh.write(os.environ.get("LOCAL_WORLD_SIZE", "1") + "\n")
    except OSError:  # the launcher then reports torchrun's own outcome: nothing else is lost
        pass


def cli_main(fn=None, *, prog: str | None = None):
    """Wrap a console entry point so UserError becomes `<prog>: error: <message>` and exit code 2, and RunEnded
    `<prog>: <message>` and its exit code. `prog` names the command (default: megabranch-<the entry point's
    module name>); use as @cli_main or @cli_main(prog="megabranch-convert")."""
    if fn is None:
        return functools.partial(cli_main, prog=prog)

    def name() -> str:
        if prog is not None:
            return prog
        mod = fn.__module__.rsplit(".", 1)[-1]
        if mod == "__main__":  # python -m megabranch.train: name it after the file
            mod = os.path.splitext(os.path.basename(sys.argv[0]))[0]
        return f"megabranch-{mod}"

    @functools.wraps(fn)
    def wrapper(argv=None):
        try:
            return fn(argv)
        except UserError as e:
            print(f"{name()}: error: {e}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        except RunEnded as e:
            if str(e):
                print(f"{name()}: {e}", file=sys.stderr)
            if e.exit_code == EXIT_REQUEUE:
                note_stopped()
            if e.abrupt:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(e.exit_code)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
