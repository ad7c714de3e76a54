"""User-facing errors: bad input is reported as one clear line, never a deep traceback."""
import functools
import logging
import sys


class UserError(Exception):
    """A problem with the user's input (file, folder, flag): the message names it and what is wrong."""


_SAID: set[str] = set()  # what this process has logged through log_once


def log_once(logger: logging.Logger, level: int, message: str) -> None:
    """Log ``message`` once per process: a suite resolves each run's config and registers its
    datasets at every step, so a warning would otherwise be repeated for every run."""
    if message not in _SAID:
        _SAID.add(message)
        logger.log(level, message)


# What `make setup` installs that a tool may find missing (detectron2 comes from an sdist, not a wheel).
SETUP_INSTALLS = {"detectron2", "lvis", "cityscapesscripts", "pycocotools"}


def cli(main):
    """Decorate a tool's ``main``: a UserError, or a missing package that `make setup` installs, becomes
    ``error: <message>`` on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except ModuleNotFoundError as e:
            package = (e.name or "").split(".")[0]
            if package not in SETUP_INSTALLS:
                raise
            print(f"error: {package} is not installed: run `make setup` (README, 'Installing detectron2')",
                  file=sys.stderr)
            sys.exit(2)

    return wrapper


def said(output: str) -> str | None:
    """The last one-line error a tool printed (``error: <message>``, as ``cli`` prints it) in its
    output, without the prefix; None when it printed none."""
    messages = [line.strip().removeprefix("error: ") for line in output.replace("\r", "\n").splitlines()
                if line.strip().startswith("error: ")]
    return messages[-1] if messages else None
