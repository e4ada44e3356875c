"""User errors: one line naming the problem, exit code 2, no traceback."""

import functools
import sys


class UserError(Exception):
    """A mistake in the user's input (file, config, checkpoint); printed as one line, never as a traceback."""


def cli_main(fn):
    """Wrap a console entry point so UserError becomes `<prog>: error: <message>` and exit code 2."""

    @functools.wraps(fn)
    def wrapper(argv=None):
        try:
            return fn(argv)
        except UserError as e:
            prog = fn.__module__.rsplit(".", 1)[-1]
            if prog == "__main__":  # python -m megabranch.train: name it after the file
                import os

                prog = os.path.splitext(os.path.basename(sys.argv[0]))[0]
            print(f"megabranch-{prog}: error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
