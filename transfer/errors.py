"""User-facing errors: bad input is reported as one clear line, never a deep traceback."""
import functools
import sys


class UserError(Exception):
    """A problem with the user's input (file, folder, flag): the message names it and what is wrong."""


def cli(main):
    """Decorate a tool's ``main``: a UserError becomes ``error: <message>`` on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper
