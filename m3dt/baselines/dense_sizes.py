"""Parameter counts of the dense Prompt-DT configurations (configs/dense/prompt_dt_e{E}.yaml) against M3DT
with E experts, for the paper's claim that more dense parameters do not close the gap.

    python -m m3dt.baselines.dense_sizes                 # the shipped configurations, as a markdown table
    python -m m3dt.baselines.dense_sizes --n_layer 12    # the width that matches each E at another depth

Counts are of the models as this project builds them (no weights are allocated: the meta device).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from m3dt.cli import command
from m3dt.config import Config, load_yaml
from m3dt.model import build_model

DENSE_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "dense"


def parameter_count(config: Config, num_experts: int = 0, prompt: bool = True) -> int:
    """Parameters of the Prompt-DT `config` describes, with a routed mixture of `num_experts` experts
    (the M3DT model of stage 3) when num_experts > 0, without the prompt embeddings when not `prompt` (MTDT)."""
    with torch.device("meta"):
        model = build_model(config, config.dropout, prompt=prompt)
        if num_experts:
            model.install_experts(num_experts, routed=True)
    return sum(parameter.numel() for parameter in model.parameters())


def matched_width(target: int, n_layer: int, n_head: int, step: int = 16) -> tuple[int, int]:
    """The width (a multiple of `step` and of n_head) whose dense count at `n_layer` layers is closest to
    `target`, and that count."""
    best = (0, 0)
    width = step
    while True:
        if width % n_head == 0:
            count = parameter_count(Config(embed_dim=width, n_layer=n_layer, n_head=n_head))
            if abs(count - target) < abs(best[1] - target):
                best = (width, count)
            if count > target:
                return best
        width += step


def dense_configs() -> dict[int, Path]:
    """Expert count -> the shipped dense configuration that matches it."""
    found = {int(re.fullmatch(r"prompt_dt_e(\d+)\.yaml", path.name).group(1)): path
             for path in DENSE_CONFIGS.glob("prompt_dt_e*.yaml")}
    return dict(sorted(found.items()))


def table(n_layer: int | None = None) -> str:
    """A markdown table, one row per shipped dense configuration: M3DT's parameters at the paper's size with E experts
    against the dense configuration's, or, with `n_layer`, against the width that matches them at that depth."""
    lines = ["| experts E | M3DT parameters | dense config | dense parameters | dense / M3DT |", "|---|---:|---|---:|---:|"]
    paper = Config()
    for experts, path in dense_configs().items():
        target = parameter_count(paper, experts)
        if n_layer is None:
            dense = Config(**load_yaml(str(path)))
            where = path.name
        else:
            width, _ = matched_width(target, n_layer, paper.n_head)
            dense = Config(embed_dim=width, n_layer=n_layer, n_head=paper.n_head)
            where = f"--embed_dim {width} --n_layer {n_layer}"
        count = parameter_count(dense)
        lines.append(f"| {experts} | {target:,} | {where} (width {dense.embed_dim}, {dense.n_layer} layers) | "
                     f"{count:,} | {count / target:.3f} |")
    return "\n".join(lines)


@command
def main(argv: list[str] | None = None) -> None:
    """Print the parameter table (`table`) for the command line `argv` (default sys.argv[1:])."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n_layer", type=int, help="print the matching width at this depth instead")
    args = parser.parse_args(argv)
    print(f"M3DT at the paper's size (width 256, 6 layers, 8 heads, routers {Config().router_widths()}); "
          "parameters as built by this project")
    print(table(args.n_layer))


if __name__ == "__main__":
    main()
