"""Stage 3: train the routers over the frozen backbone and all experts (writes stage3/{grouping}_{E}/moe.safetensors)."""

from m3dt.stages import run_cli, train_router

if __name__ == "__main__":
    run_cli(train_router, __doc__)
