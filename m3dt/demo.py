"""The whole M3DT pipeline on a built-in suite, with no download: data from real simulators and experts.

    python -m m3dt.demo                          # configs/demo.yaml: 10 Meta-World tasks, small model
    python -m m3dt.demo --config configs/demo.yaml --backbone_steps 20000 ...   # any option can be scaled

1. collect the suite's offline data with Meta-World's scripted experts (m3dt.collect),
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
from m3dt.config import Config, parse_config
from m3dt.evaluate import evaluate
from m3dt.cli import USER_ERRORS, command, exit_with_message
from m3dt.stages import group_tasks, train_backbone, train_experts, train_router
from m3dt.tasks import FAMILIES, resolve_tasks

DEFAULT_CONFIG = "configs/demo.yaml"


def side_by_side(results: dict[str, dict]) -> str:
    """One row per family and the total, one column per evaluated policy."""
    names = list(results)
    lines = ["| family | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    families = [family for family in FAMILIES if family in next(iter(results.values()))["families"]]
    for family in families:
        lines.append(f"| {family} | " + " | ".join(f"{results[name]['families'][family]['score']:.1f}" for name in names) + " |")
    lines.append("| **total** | " + " | ".join(f"**{results[name]['total']['score']:.1f}**" for name in names) + " |")
    return "\n".join(lines)


def run_demo(config: Config) -> dict[str, dict]:
    started = time.perf_counter()
    task_names = resolve_tasks(config.prefix_name, config.tasks, config.seed)
    print(f"== 1/6 collecting {config.demo_episodes} episodes of {len(task_names)} tasks into {config.data_path}")
    summary = collect(task_names, config.demo_episodes, Path(config.data_path), config.seed, config.demo_noise,
                      os.cpu_count() if config.workers is None else config.workers, None)
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
                          workers=config.workers, seed=config.seed, device=config.device)
        results[result["method"]] = result
    minutes = (time.perf_counter() - started) / 60
    print(f"\nScores on the demo suite ({len(task_names)} tasks, {minutes:.1f} min in all):\n")
    print(side_by_side(results))
    return results


@command
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--config" not in argv:
        argv = ["--config", DEFAULT_CONFIG, *argv]
    try:
        run_demo(parse_config(__doc__, argv))
    except (*USER_ERRORS, CollectError) as error:
        exit_with_message(error, "--debug" in argv)


if __name__ == "__main__":
    main()
