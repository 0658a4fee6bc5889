"""How every command ends when it cannot go on: bad input is one line naming the file and what is wrong
(exit code 2), Ctrl-C (or SIGTERM) is one line saying where it stopped and how to go on (exit code 130, or 143,
as a shell reports an interrupted program); tracebacks only with --debug."""

from __future__ import annotations

import functools
import signal
import sys
from typing import Callable, NoReturn, TypeVar

import m3dt
from m3dt import command_started
from m3dt.config import ConfigError
from m3dt.data import DataError
from m3dt.run import ArtifactError
from m3dt.tasks import TaskError
from m3dt.train import TrainingError

USER_ERRORS = (ArtifactError, ConfigError, DataError, TaskError, TrainingError)
INTERRUPTED_EXIT_CODES = (128 + signal.SIGINT, 128 + signal.SIGTERM)  # as a shell reports them
Main = TypeVar("Main", bound=Callable)


def exit_with_message(error: Exception, debug: bool) -> NoReturn:
    """Bad input: print `error` as one line "error: ..." to stderr and exit with code 2 (SystemExit); with `debug`,
    re-raise it instead (a traceback)."""
    if debug:
        raise error
    one_line = " ".join(str(error).split())  # some library messages quoted in ours span several lines
    print(f"error: {one_line}", file=sys.stderr)
    sys.exit(2)


def exit_interrupted(interrupt: KeyboardInterrupt, debug: bool) -> NoReturn:
    """Ctrl-C: one line and exit code 130 (SIGTERM: 143). The training loop's message says at which step it stopped and
    from which checkpoint a rerun resumes; elsewhere the line says what is kept (every file is written
    atomically, so nothing is half-written)."""
    if debug:
        raise interrupt
    message = " ".join(str(interrupt).split()) or (
        "stopped before the end; every file written so far is kept, whole (files are written atomically): "
        "rerun the same command to go on")
    print(f"interrupted ({m3dt.stopped_by}): {message}", file=sys.stderr)
    sys.exit(128 + (signal.SIGTERM if m3dt.stopped_by == "SIGTERM" else signal.SIGINT))


def command(main: Main) -> Main:
    """Decorate an entry point's `main(argv=None)` so that Ctrl-C ends it as `exit_interrupted` says."""

    @functools.wraps(main)
    def guarded(argv: list[str] | None = None, *args, **kwargs):
        command_started()
        try:
            return main(argv, *args, **kwargs)
        except KeyboardInterrupt as interrupt:
            exit_interrupted(interrupt, "--debug" in (sys.argv[1:] if argv is None else argv))

    return guarded  # type: ignore[return-value]
