"""M3DT, the Mixture-of-Experts Decision Transformer (Kong et al., ICML 2025): README.md says what each module does.

A command (`python -m m3dt.NAME`, or one of the stage scripts) spends its first seconds importing torch and the
simulators, where Ctrl-C would end in a traceback through the import machinery. Until the command's own
handling takes over (`command_started`, called by m3dt.cli.command and the stage scripts' run_cli), Ctrl-C ends
it in one line instead, exit code 130. Importing m3dt from a program of one's own leaves Python's handler alone.
"""

import signal
import sys
import threading
from pathlib import Path

STAGE_SCRIPTS = ("stage1_backbone_train.py", "stage2_task_grouping_gradient.py", "stage2_task_grouping_random.py",
                 "stage2_expert_train.py", "stage3_router_train.py")


def interrupted_while_starting(signal_number: int, frame: object) -> None:
    """SIGINT before the command started: nothing was written yet."""
    print("interrupted (Ctrl-C) while starting: nothing was written", file=sys.stderr)
    sys.exit(128 + signal.SIGINT)


def command_started() -> None:
    """From here on Ctrl-C is a KeyboardInterrupt again, which the command turns into its one line; so is SIGTERM
    (a scheduler's or a shard script's stop, which ended a command silently), where nobody set a handler."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) is interrupted_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, terminated)


stopped_by = "Ctrl-C"  # what stopped the command, for its one line (m3dt.cli.exit_interrupted)


def terminated(signal_number: int, frame: object) -> None:
    """SIGTERM: stop as Ctrl-C does (the training loop says the step and the checkpoint to resume from)."""
    global stopped_by
    stopped_by = "SIGTERM"
    raise KeyboardInterrupt


# `python -m m3dt.NAME` imports this package while sys.argv[0] is still "-m"; a stage script is argv[0] itself. A
# SIGINT that was ignored (a job started in the background by a shell) stays ignored.
if ((sys.argv[:1] == ["-m"] or Path(sys.argv[0] if sys.argv else "").name in STAGE_SCRIPTS)
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
    signal.signal(signal.SIGINT, interrupted_while_starting)
