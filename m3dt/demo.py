"""The whole M3DT pipeline on a built-in suite, with no download: data from real simulators and experts.

    python -m m3dt.demo                          # configs/demo.yaml: 10 Meta-World tasks, small model
    python -m m3dt.demo --config configs/demo.yaml --backbone_steps 20000 ...   # any option can be scaled

1. collect the suite's offline data with Meta-World's scripted experts (m3dt.collect) on the MT1 goals of
   --demo_collect_seed, apart from the goals of --seed that evaluation uses,
2. stage 1 backbone, 3. stage 2 gradient grouping, 4. stage 2 experts (all in one process),
5. stage 3 router, 6. evaluate a random policy, the stage-1 backbone (Prompt-DT) and the MoE (M3DT) in the
simulator, and print their scores side by side. Every step resumes: rerun the command after an interruption.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

from m3dt.collect import CollectError, collect, print_table
from m3dt.config import Config, ConfigError, parse_config
from m3dt.data import MIN_EPISODES
from m3dt.evaluate import check_episodes, check_options, describe_settings, evaluate, score_note
from m3dt.cli import USER_ERRORS, command, exit_with_message
from m3dt.stages import group_tasks, train_backbone, train_experts, train_router
from m3dt.tasks import FAMILIES, resolve_tasks

DEFAULT_CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "demo.yaml")  # wherever it runs from


def side_by_side(results: dict[str, dict]) -> str:
    """One row per family and the total, one column per evaluated policy, then what the scores are and how they
    were measured (the settings and score scales of the first learned policy's result: all three ran with the same
    settings, and the random policy's leave out the context, which it does not read)."""
    names = list(results)
    first = next(iter(results.values()))
    learned = next((result for result in results.values() if result.get("method_id") != "random"), first)
    lines = [f"Evaluated with {describe_settings(learned)}.", "",
             "| family | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    families = [family for family in FAMILIES if family in first["families"]]
    for family in families:
        lines.append(f"| {family} | " + " | ".join(f"{results[name]['families'][family]['score']:.1f}" for name in names) + " |")
    lines.append("| **total** | " + " | ".join(f"**{results[name]['total']['score']:.1f}**" for name in names) + " |")
    notes = list(dict.fromkeys(result["protocol"]["note"] for result in results.values() if result["protocol"]["note"]))
    return "\n".join(lines + ["", score_note(first)] + (notes or ["Full evaluation protocol."]))


def check_demo_options(config: Config, task_names: list[str]) -> None:
    """The collection and evaluation settings, checked before anything runs (evaluation comes last)."""
    if config.demo_episodes < MIN_EPISODES:
        raise ConfigError(f"--demo_episodes must be at least {MIN_EPISODES}, got {config.demo_episodes}")
    check_options(config.eval_episodes, config.eval_max_steps, config.workers, None, config.seed, config.context_actions)
    check_episodes(task_names, config.eval_episodes)


def run_demo(config: Config) -> dict[str, dict]:
    """The six steps of the module docstring, each resuming where it stopped; prints the scores side by side and
    returns the evaluation results (random, Prompt-DT, M3DT) by method name. Raises ConfigError, CollectError and
    the stages' errors for bad input."""
    started = time.perf_counter()
    task_names = resolve_tasks(config.prefix_name, config.tasks, config.seed)
    check_demo_options(config, task_names)
    # The data's Meta-World goals are those of MT1 seeded with demo_collect_seed, evaluation's those of the
    # run seed: apart, the evaluation measures generalisation to new goals rather than memorisation.
    print(f"== 1/6 collecting {config.demo_episodes} episodes of {len(task_names)} tasks into {config.data_path} "
          f"(seed {config.demo_collect_seed})")
    summary = collect(task_names, config.demo_episodes, Path(config.data_path), config.demo_collect_seed,
                      config.demo_noise, os.cpu_count() if config.workers is None else config.workers, None)
    print_table(summary, task_names)
    print("== 2/6 stage 1: backbone")
    train_backbone(config)
    print(f"== 3/6 stage 2: gradient grouping into {config.group_num} groups")
    group_tasks(config, "gradient")
    print("== 4/6 stage 2: experts (--all)")
    train_experts(dataclasses.replace(config, all=True, expert_id=None))
    print("== 5/6 stage 3: router")
    train_router(config)
    print("== 6/6 evaluating in the simulator")
    results = {}
    for stage in ("random", "1", "3"):
        result = evaluate(str(config.resolved_run_dir()), stage, config.grouping, config.expert_num,
                          tasks=",".join(task_names), episodes=config.eval_episodes, max_steps=config.eval_max_steps,
                          workers=config.workers, seed=config.seed, device=config.device,
                          context_actions=config.context_actions)
        results[result["method"]] = result
    minutes = (time.perf_counter() - started) / 60
    print(f"\nScores on the demo suite ({len(task_names)} tasks; this command: {minutes:.1f} min, not counting steps "
          "an earlier run finished):\n")
    print(side_by_side(results))
    return results


@command
def main(argv: list[str] | None = None) -> None:
    """`python -m m3dt.demo`: the demo with configs/demo.yaml unless `argv` (default sys.argv[1:]) gives --config; bad
    input ends as one line and exit code 2 (SystemExit), a traceback with --debug."""
    argv = sys.argv[1:] if argv is None else argv
    if "--config" not in argv:
        argv = ["--config", DEFAULT_CONFIG, *argv]
    try:
        run_demo(parse_config(__doc__, argv))
    except (*USER_ERRORS, CollectError) as error:
        exit_with_message(error, "--debug" in argv)


if __name__ == "__main__":
    main()
