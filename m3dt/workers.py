"""Worker processes (data loading, evaluation envs, collection): spawned, never forked (MuJoCo and torch state
must not be forked), and deaf to Ctrl-C, which the main process handles with one line before it ends them."""

from __future__ import annotations

import multiprocessing
import signal
from contextlib import contextmanager
from typing import Iterator

SPAWN = multiprocessing.get_context("spawn")


@contextmanager
def starting_workers() -> Iterator[None]:
    """Start worker processes inside this block: they ignore SIGINT from their first instruction (an ignored
    signal stays ignored across exec, and Python leaves it so), so a Ctrl-C while they still import torch
    prints no traceback of theirs. The main process has its own handler back as soon as they are started."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
