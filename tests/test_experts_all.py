"""`--all` expert training (whole or in shards) optimises every expert exactly as its own separate run would."""

import dataclasses
import shutil

import torch
from safetensors.torch import load_file

from m3dt.config import Config
from m3dt.stages import group_tasks, train_backbone, train_experts
from tests.conftest import SMALL_TASKS


def test_all_experts_in_one_process_equal_separate_runs(small_data, tmp_path, capsys):
    together = tmp_path / "together"
    config = Config(tasks=",".join(SMALL_TASKS), data_path=str(small_data), run_dir=str(together), embed_dim=32,
                    n_layer=2, n_head=2, warmup_steps=3, learning_rate=1e-3, max_iters=5, log_every=5,
                    save_every=5, device="cpu", workers=0, group_num=3, expert_num=3, grouping="random")
    train_backbone(config)
    group_tasks(config, "random")
    separate, sharded, partial = tmp_path / "separate", tmp_path / "sharded", tmp_path / "partial"
    for copy in (separate, sharded, partial):
        shutil.copytree(together, copy)

    # dropout off: its masks are drawn from one stream per process, the only randomness not kept per expert
    experts = dataclasses.replace(config, dropout=0.0, max_iters=12, grad_clip=0.05)  # tight clip: it acts
    train_experts(dataclasses.replace(experts, all=True))
    for expert_id in range(3):
        train_experts(dataclasses.replace(experts, run_dir=str(separate), expert_id=expert_id))
    # what stage2_expert_train_total.sh runs on 2 GPUs: experts 0 and 2 in one process, expert 1 in another
    for shard in ("0/2", "1/2"):
        train_experts(dataclasses.replace(experts, run_dir=str(sharded), all=True, shard=shard))

    for expert_id in range(3):
        name = f"stage2/experts_random_3/expert_{expert_id}.safetensors"
        in_one = load_file(together / name)
        initial_norm = sum(tensor.norm() for tensor in in_one.values())
        assert initial_norm > 0
        for other in (separate, sharded):
            alone = load_file(other / name)
            for key in alone:
                torch.testing.assert_close(in_one[key], alone[key], rtol=1e-5, atol=1e-6)
    # one expert finished alone, then --all: it is trained again with the others, and the stage says so
    train_experts(dataclasses.replace(experts, run_dir=str(partial), expert_id=1))
    capsys.readouterr()
    train_experts(dataclasses.replace(experts, run_dir=str(partial), all=True))
    assert ("note: experts [1] are already finished; this job trains them again with the others and replaces them "
            "(train the others alone with --expert_id to keep them)") in capsys.readouterr().out
