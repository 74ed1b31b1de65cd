"""User errors: mistakes a user can fix, reported as one line ``<prog>: <what is wrong>: <how to fix it>``.

Every command (``emo``, ``emo-data``, ``emo-experts``) runs under :func:`run_cli`: a :class:`UserError` prints its
one line on stderr and exits with status 2, without a traceback; anything else is a bug and keeps its traceback.
``EMO_DEBUG=1`` or ``--debug`` shows the traceback of a user error too. The type lives in the lowest layer (the
standard library only) so that ``data_tools`` needs nothing of ``emo_lightning``; ``emo_lightning.errors``
re-exports it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

USER_ERROR_EXIT = 2


class UserError(Exception):
    """A mistake the user can fix. ``what`` names the path, key or value that is wrong; ``fix`` says how to fix
    it (may be empty when ``what`` already says it, e.g. ``router.pool_min: must be >= 2, got 1``)."""

    def __init__(self, what: str, fix: str = "") -> None:
        super().__init__(f"{what}: {fix}" if fix else what)
        self.what, self.fix = what, fix

    def __reduce__(self):  # picklable across worker processes (keeps the subclass)
        return (type(self), (self.what, self.fix))


def debug_requested(argv: Sequence[str]) -> tuple[bool, list[str]]:
    """(show tracebacks of user errors?, ``argv`` without ``--debug``)."""
    rest = [a for a in argv if a != "--debug"]
    env = os.environ.get("EMO_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
    return env or len(rest) < len(argv), rest


def run_cli(
    prog: str,
    main: Callable[[list[str]], object],
    argv: Sequence[str] | None = None,
    faults: tuple[type[BaseException], ...] = (),
) -> None:
    """Run ``main(argv)``; a :class:`UserError` becomes one line on stderr and exit status 2, an operational fault
    (``faults``: e.g. a disk that filled up while writing) one line naming its type and exit status 1."""
    debug, args = debug_requested(sys.argv[1:] if argv is None else list(argv))
    try:
        main(args)
    except UserError as err:
        if debug:
            raise
        print(f"{prog}: {err}", file=sys.stderr)
        raise SystemExit(USER_ERROR_EXIT) from None
    except faults as err:
        if debug:
            raise
        print(f"{prog}: {type(err).__name__}: {err}", file=sys.stderr)
        raise SystemExit(1) from None


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` with a one-line error (no usage block): ``prog: message: see prog --help``."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: {message}: see {self.prog} --help", file=sys.stderr)
        raise SystemExit(USER_ERROR_EXIT)
