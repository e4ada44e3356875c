"""A small tmpfs for one command: the command runs in a private mount namespace (`unshare -rm`: a user namespace
too, so no root is needed where the kernel allows them), where a tmpfs with the given mount options is mounted
at a directory; the mount vanishes with the command and is never seen by the rest of the machine."""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile

_SCRIPT = 'mount -t tmpfs -o "$0" megabranch-test "$1" && shift && exec "$@"'  # $0: options, $1: where


def with_tmpfs(where: str, options: str, argv: list[str]) -> list[str]:
    """argv, run with a tmpfs (mount -o `options`, e.g. "size=64k" or "ro") mounted at the directory `where`."""
    return ["unshare", "-rm", "sh", "-c", _SCRIPT, options, where, *argv]


@functools.cache
def tmpfs_unavailable() -> str | None:
    """Why with_tmpfs cannot work here (no unshare, user or mount namespaces refused), or None when it can."""
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    with tempfile.TemporaryDirectory() as d:
        probe = subprocess.run(with_tmpfs(d, "size=64k", ["true"]), capture_output=True, text=True)
    return None if probe.returncode == 0 else f"cannot mount a tmpfs in a private namespace: {probe.stderr.strip()}"
