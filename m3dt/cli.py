"""How every command reports bad input: one line naming the file and what is wrong, exit code 2, and the
traceback only with --debug."""

from __future__ import annotations

import sys
from typing import NoReturn

from m3dt.config import ConfigError
from m3dt.data import DataError
from m3dt.run import ArtifactError
from m3dt.tasks import TaskError
from m3dt.train import TrainingError

USER_ERRORS = (ArtifactError, ConfigError, DataError, TaskError, TrainingError)


def exit_with_message(error: Exception, debug: bool) -> NoReturn:
    if debug:
        raise error
    one_line = " ".join(str(error).split())  # some library messages quoted in ours span several lines
    print(f"error: {one_line}", file=sys.stderr)
    sys.exit(2)
