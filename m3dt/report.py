"""Gather evaluated run directories into the paper's tables and plots.

    python -m m3dt.report runs/mt10_seed0 runs/mt80_seed0 runs/mt160_seed0 ... [--out report]

Reads every `eval/*/results.json` under the given run directories (written by m3dt.evaluate) and writes
`report.md` with
  - score per family and total by number of tasks and method (Prompt-DT = stage-1 backbone, M3DT),
  - M3DT score by number of experts,
averaged over the runs (seeds) that share a row, and two line plots (score against task count and against
expert count) with the paper's published numbers drawn beside ours.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from m3dt.cli import command, exit_with_message
from m3dt.config import ArgumentParser, Config, ConfigError, load_yaml
from m3dt.run import atomic_path
from m3dt.tasks import FAMILIES

# Published M3DT totals (Kong et al., ICML 2025) by task count, and the best baseline's.
PAPER_M3DT = {10: 89.23, 80: 80.66, 160: 78.21}
PAPER_BEST_BASELINE = {10: 88.92, 80: 75.70, 160: 71.65}


def collect_results(run_dirs: list[Path]) -> list[dict]:
    results = []
    for run_dir in run_dirs:
        files = sorted(run_dir.glob("eval/*/results.json"))
        if not files:
            raise FileNotFoundError(f"{run_dir}: no eval/*/results.json (run python -m m3dt.evaluate first)")
        for path in files:
            results.append(json.loads(path.read_text()))
    return results


def mean_row(group: list[dict]) -> dict[str, str]:
    """Family and total scores averaged over runs, as 'mean' or 'mean ± std (n)'."""
    row = {}
    for key in (*FAMILIES, "total"):
        entries = [result["total"] if key == "total" else result["families"].get(key, {}) for result in group]
        scores = [entry["score"] for entry in entries if "score" in entry]
        if not scores:
            row[key] = "-"
        elif len(scores) == 1:
            row[key] = f"{scores[0]:.2f}"
        else:
            row[key] = f"{np.mean(scores):.2f} ± {np.std(scores):.2f} ({len(scores)})"
    return row


def table(groups: dict[tuple, list[dict]], key_names: tuple[str, ...]) -> str:
    header = [*key_names, *FAMILIES, "total"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in sorted(groups):
        row = mean_row(groups[key])
        lines.append("| " + " | ".join([*map(str, key), *(row[name] for name in (*FAMILIES, "total"))]) + " |")
    return "\n".join(lines)


def total_scores(groups: dict[tuple, list[dict]]) -> dict[tuple, float]:
    return {key: float(np.mean([result["total"]["score"] for result in group])) for key, group in groups.items()}


def plot_lines(path: Path, series: dict[str, dict[int, float]], x_label: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for label, points in series.items():
        xs = sorted(points)
        style = "--" if label.startswith("paper") else "-"
        axes.plot(xs, [points[x] for x in xs], style, marker="o", label=label)
    axes.set_xlabel(x_label)
    axes.set_ylabel("normalised score (mean over tasks)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120)
    plt.close(figure)


def video_links(run_dirs: list[Path], out_dir: Path) -> list[str]:
    """A section linking every rollout video the evaluations wrote (m3dt.evaluate --video), relative to the
    report's folder."""
    videos = sorted(path for run_dir in run_dirs for path in run_dir.glob("eval/*/videos/*.mp4"))
    links = [f"- {path.parents[3].name}, {path.parents[1].name}: [{path.stem}]({os.path.relpath(path, out_dir)})"
             for path in videos]
    return ["## Videos of rollouts", "", *links, ""] if links else []


def build_report(run_dirs: list[Path], out_dir: Path) -> str:
    results = collect_results(run_dirs)
    by_tasks: dict[tuple, list[dict]] = defaultdict(list)
    by_experts: dict[tuple, list[dict]] = defaultdict(list)
    for result in results:
        by_tasks[(result["total"]["tasks"], result["method"])].append(result)
        if result["method"] == "M3DT":
            by_experts[(result["total"]["tasks"], result["num_experts"])].append(result)

    text = ["# M3DT results", "", "## Score by number of tasks and method", "", table(by_tasks, ("tasks", "method")), "",
            "## M3DT score by number of experts", "", table(by_experts, ("tasks", "experts")) if by_experts else "(no M3DT runs)",
            "", "Paper (Kong et al., ICML 2025), total score by number of tasks:", "",
            "| tasks | " + " | ".join(map(str, PAPER_M3DT)) + " |", "|---|" + "---|" * len(PAPER_M3DT),
            "| M3DT | " + " | ".join(f"{score:.2f}" for score in PAPER_M3DT.values()) + " |",
            "| best baseline | " + " | ".join(f"{score:.2f}" for score in PAPER_BEST_BASELINE.values()) + " |", "",
            *video_links(run_dirs, out_dir)]
    report = "\n".join(text)

    series: dict[str, dict[int, float]] = defaultdict(dict)
    for (tasks, method), score in total_scores(by_tasks).items():
        series[method][tasks] = score
    series["paper M3DT"] = PAPER_M3DT
    series["paper best baseline"] = PAPER_BEST_BASELINE
    plot_lines(out_dir / "score_by_tasks.png", series, "number of tasks", "Score against task count")
    expert_series: dict[str, dict[int, float]] = defaultdict(dict)
    for (tasks, experts), score in total_scores(by_experts).items():
        expert_series[f"M3DT, {tasks} tasks"][experts] = score
    if expert_series:
        plot_lines(out_dir / "score_by_experts.png", expert_series, "number of experts", "Score against expert count")
    with atomic_path(out_dir / "report.md") as temporary:
        temporary.write_text(report)
    return report


@command
def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="*", type=Path, help="evaluated run directories (default: --config's run dir)")
    parser.add_argument("--config", help="YAML file of options (the stages' format): its run dir is reported")
    parser.add_argument("--out", type=Path, default=Path("report"))
    args = parser.parse_args(argv)
    try:
        config_run_dirs = [Config(**load_yaml(args.config)).resolved_run_dir()] if args.config else []
        if not (args.run_dirs or config_run_dirs):
            parser.error("give run directories or --config")
        print(build_report(args.run_dirs or config_run_dirs, args.out))
    except (FileNotFoundError, ConfigError) as error:
        exit_with_message(error, debug=False)
    print(f"wrote {args.out}/report.md and plots")

if __name__ == "__main__":
    main()
