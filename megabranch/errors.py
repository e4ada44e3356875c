"""User errors: one line naming the problem, exit code 2, no traceback."""

from __future__ import annotations

import functools
import os
import sys


class UserError(Exception):
    """A mistake in the user's input (file, config, checkpoint); printed as one line, never as a traceback."""


def cli_main(fn=None, *, prog: str | None = None):
    """Wrap a console entry point so UserError becomes `<prog>: error: <message>` and exit code 2. `prog`
    names the command (default: megabranch-<the entry point's module name>); use as @cli_main or
    @cli_main(prog="megabranch-convert")."""
    if fn is None:
        return functools.partial(cli_main, prog=prog)

    @functools.wraps(fn)
    def wrapper(argv=None):
        try:
            return fn(argv)
        except UserError as e:
            name = prog
            if name is None:
                name = fn.__module__.rsplit(".", 1)[-1]
                if name == "__main__":  # python -m megabranch.train: name it after the file
                    name = os.path.splitext(os.path.basename(sys.argv[0]))[0]
                name = f"megabranch-{name}"
            print(f"{name}: error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
