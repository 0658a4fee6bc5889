"""Stage 2: train one expert (--expert_id i) or every expert of a grouping (--all) over the frozen backbone."""

from m3dt.stages import run_cli, train_experts

if __name__ == "__main__":
    run_cli(train_experts, __doc__)
