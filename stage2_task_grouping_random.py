"""Stage 2: group tasks by a seeded random split (writes stage2/groups_random_{G}.json)."""

from functools import partial

from m3dt.stages import group_tasks, run_cli

if __name__ == "__main__":
    run_cli(partial(group_tasks, method="random"), __doc__)
