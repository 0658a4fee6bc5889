"""Stage 1: train the Prompt-DT backbone on all tasks (writes stage1/backbone.safetensors)."""

from m3dt.stages import run_cli, train_backbone

if __name__ == "__main__":
    run_cli(train_backbone, __doc__)
