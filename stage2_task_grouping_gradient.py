"""Stage 2: group tasks by K-means on gradient features of the stage-1 backbone (writes stage2/groups_gradient_{G}.json)."""

from functools import partial

from m3dt.stages import group_tasks, run_cli

if __name__ == "__main__":
    run_cli(partial(group_tasks, method="gradient"), __doc__)
