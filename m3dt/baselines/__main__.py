"""python -m m3dt.baselines --method mtdt|harmodt|m3dt-end2end|m3dt-no-grouping [any option of the stages]"""

from __future__ import annotations

import argparse
import sys

from m3dt.baselines import METHODS, method_module, train_baseline
from m3dt.stages import run_cli


def main(argv: list[str] | None = None) -> None:
    """Train the --method named in `argv` (default sys.argv[1:]) with the stages' options; --help without a method
    lists every stage option."""
    arguments = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--method", choices=METHODS, required="-h" not in arguments and "--help" not in arguments)
    known, rest = parser.parse_known_args(arguments)
    if known.method is None:  # --help without a method: the methods, then every stage option
        rest = ["--help"]
    description = (f"Train a comparison method ({', '.join(METHODS)}) into {{run_dir}}/baselines/{{method}}/. "
                   + (method_module(known.method).__doc__ if known.method else __doc__))
    run_cli(lambda config: train_baseline(config, known.method), description, rest)


if __name__ == "__main__":
    main()
