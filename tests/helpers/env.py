"""Where the tests run: the repository root, the environment of the subprocesses they start, one torch thread."""

from __future__ import annotations

import contextlib
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def subprocess_env(**extra) -> dict:
    """This environment for a child process: this checkout importable, one OpenMP thread (the CPU is shared),
    no WORLD_SIZE leaking in from an outer launcher, plus `extra` (values made strings)."""
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


@contextlib.contextmanager
def one_thread():
    """Tiny matrices run best on one thread; and no OpenMP spin-waiting while gloo workers share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
