"""What a stage's identity covers besides its options: the data it reads (stage 1 on other data is not
"already finished", a resume refuses other data, stages 2-3 and evaluation refuse data other than stage 1's),
the device (printed, recorded resolved, and a checkpoint's random streams resume only on its device type),
and the router widths tied to the model width."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from m3dt.config import Config, parse_config
from m3dt.evaluate import load_statistics
from m3dt.moe import ExpertMixture
from m3dt.run import ArtifactError, RunDir, load_checkpoint, safetensors_damage, save_checkpoint, save_tensors
from m3dt.stages import group_tasks, train_backbone, train_experts, train_router
from m3dt.synthetic import make_dataset, write_episode
from tests.test_pipeline import TINY

TASKS = ["reach-v2", "walker-walk"]


def argv(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [*TINY, "--tasks", ",".join(TASKS), "--save_every", "5", "--log_every", "5", "--data_path", str(data),
            "--run_dir", str(run_dir), "--grouping", "random", "--expert_num", "2", "--group_num", "2", *extra]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    """`a`; `more`: one episode more per task (other files); `edited`: a's files, one of them with other
    contents of the same size (np.savez is uncompressed: same shapes, same bytes count)."""
    root = tmp_path_factory.mktemp("identity_data")
    data = {"a": make_dataset(root / "a", TASKS, episodes=4, steps=20),
            "more": make_dataset(root / "more", TASKS, episodes=5, steps=20)}
    data["edited"] = Path(shutil.copytree(data["a"], root / "edited"))
    episode = data["edited"] / "walker-walk" / "0.npz"
    with np.load(episode) as archive:
        arrays = dict(archive)
    size = episode.stat().st_size
    write_episode(episode, arrays["observations"] + 1.0, arrays["actions"], arrays["rewards"])
    assert episode.stat().st_size == size
    return data


@pytest.fixture(scope="module")
def stage1_run(datasets, tmp_path_factory) -> Path:
    """Stage 1 on `a` for 10 steps (checkpoints at 5 and 10), and a random grouping."""
    run_dir = tmp_path_factory.mktemp("identity_run")
    train_backbone(parse_config("", argv(datasets["a"], run_dir, "--max_iters", "10")))
    group_tasks(parse_config("", argv(datasets["a"], run_dir)), "random")
    return run_dir


def test_stage1_on_other_data_is_not_finished_and_does_not_resume(datasets, stage1_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(stage1_run / "stage1", run_dir / "stage1")
    train_backbone(parse_config("", argv(datasets["a"], run_dir, "--max_iters", "10")))
    assert "stage 1 already finished (10 steps)" in capsys.readouterr().out
    # other files: not finished, and the checkpoint is not resumed; the same files with other contents are
    # told apart once loaded (the cheap fingerprint is names and sizes), so the resume of a longer run refuses
    # (the finished backbone refuses what its manifest tells apart; the checkpoint what loading tells apart)
    files = r"data \(--data_path, --max_episodes: other episode files\); --restart"
    for data, steps, extra, what in [
            ("more", "10", [], f"backbone.safetensors: made with other settings: {files}"),
            ("a", "10", ["--max_episodes", "3"], f"backbone.safetensors: made with other settings: {files}"),
            ("edited", "15", [], r"train_state.pt: checkpoint was made with other settings: data \(the same files with "
                                 r"other contents: other per-task statistics\); rerun with --restart")]:
        with pytest.raises(ArtifactError, match=what):
            train_backbone(parse_config("", argv(datasets[data], run_dir, "--max_iters", steps, *extra)))
        assert "already finished" not in capsys.readouterr().out
    # --restart trains on the new data; a run shorter than the warmup says so, and every stage names its device
    train_backbone(parse_config("", argv(datasets["more"], run_dir, "--max_iters", "5", "--restart",
                                         "--warmup_steps", "10", "--device", "auto")))
    out = capsys.readouterr().out
    assert "[stage1] training on cpu (fp32), steps 0..5" in out
    assert "[stage1] note: 5 steps end inside the 10-step warmup: the learning rate reaches only 50% of 0.001" in out
    manifest = json.loads((run_dir / "stage1" / "backbone.manifest.json").read_text())
    assert manifest["steps_done"] == 5 and manifest["config"]["data_path"] == str(datasets["more"])
    assert manifest["config"]["device"] == "cpu"  # resolved, not "auto"


@pytest.mark.parametrize("stage", ["experts", "router", "gradient grouping"])
def test_later_stages_refuse_data_other_than_stage1s(datasets, stage1_run, stage):
    run = {"experts": lambda c: train_experts(c), "router": lambda c: train_router(c),
           "gradient grouping": lambda c: group_tasks(c, "gradient")}[stage]
    extra = ["--all"] if stage == "experts" else []
    backbone = stage1_run / "stage1" / "backbone.safetensors"
    with pytest.raises(ArtifactError, match=f"{backbone}: stage 1 trained on other data for reach-v2: --data_path "
                                            f"{datasets['more']} with --max_episodes 2000 selects other episode files"):
        run(parse_config("", argv(datasets["more"], stage1_run, *extra)))
    if stage != "experts":  # the experts have not been trained here: the router stops on them first
        return
    with pytest.raises(ArtifactError, match=f"stage 1 trained on other data for walker-walk: the files under "
                                            f"--data_path {datasets['edited']} hold other episodes"):
        run(parse_config("", argv(datasets["edited"], stage1_run, *extra)))


def test_data_changed_under_stage1s_own_path_is_told_apart_from_another_path(datasets, stage1_run, tmp_path):
    """Same --data_path as stage 1, other files there: the advice is not to give stage 1's path (it is given)."""
    run_dir, data = tmp_path / "run", tmp_path / "data"
    shutil.copytree(stage1_run / "stage1", run_dir / "stage1")
    shutil.copytree(datasets["more"], data)
    manifest_file = run_dir / "stage1" / "backbone.manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["config"]["data_path"] = str(data)  # as if stage 1 had read this folder before the files changed
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="selects other episode files; stage 1 was given the same --data_path and "
                                            "--max_episodes, so the data there changed since: restore it, or train "
                                            r"again from stage 1 \(--restart\)"):
        group_tasks(parse_config("", argv(data, run_dir)), "gradient")


def test_evaluation_refuses_statistics_that_are_not_stage1s(stage1_run, tmp_path):
    run = RunDir(tmp_path / "run")
    shutil.copytree(stage1_run / "stage1", run.stage1)
    assert load_statistics(run).state_mean.shape == (2, 39)
    save_tensors(run.data_stats, {"state_mean": torch.zeros(2, 39), "state_std": torch.ones(2, 39)})
    with pytest.raises(ArtifactError, match="data_stats.safetensors: not the data statistics stage 1 wrote"):
        load_statistics(run)


def test_manifests_record_the_resolved_device_and_router_widths(stage1_run):
    manifests = [stage1_run / "stage1" / "backbone.manifest.json", stage1_run / "stage2" / "groups_random_2.manifest.json"]
    stage1, grouping = (json.loads(path.read_text()) for path in manifests)
    assert stage1["config"]["device"] == "cpu" and grouping["config"]["device"] is None  # a random split uses none
    assert stage1["config"]["router_hidden"] == "128,128,128,64"  # tied to embed_dim 32


def test_a_checkpoint_resumes_only_on_its_device_type(datasets, stage1_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(stage1_run / "stage1", run_dir / "stage1")
    checkpoint = run_dir / "stage1" / "train_state.pt"
    state = load_checkpoint(checkpoint)
    assert state["rng"][0]["device"] == "cpu" and "cuda" not in state["rng"][0]  # only the training device's
    state["rng"][0]["device"] = "cuda"  # as a checkpoint written on a GPU says
    save_checkpoint(checkpoint, state)
    with pytest.raises(ArtifactError, match="train_state.pt: checkpoint was trained on cuda; its random streams cannot "
                                            "continue on cpu: rerun with --device cuda to resume, or --restart"):
        train_backbone(parse_config("", argv(datasets["a"], run_dir, "--max_iters", "15")))


def test_batch_streams_of_an_older_gpu_checkpoint_are_refused_in_one_line(datasets, stage1_run, tmp_path):
    """Older versions kept the sampler's streams on the GPU: a CUDA generator state (16 bytes, Philox) that a
    CPU generator cannot take; resuming says so instead of failing inside Generator.set_state."""
    run_dir = tmp_path / "run"
    shutil.copytree(stage1_run / "stage1", run_dir / "stage1")
    checkpoint = run_dir / "stage1" / "train_state.pt"
    state = load_checkpoint(checkpoint)
    state["rng"][0]["sampler"] = [torch.zeros(16, dtype=torch.uint8) for _ in state["rng"][0]["sampler"]]
    save_checkpoint(checkpoint, state)
    with pytest.raises(ArtifactError, match="train_state.pt: checkpoint's batch streams were written by an older "
                                            "version of m3dt .on the GPU. and cannot continue here; rerun with --restart"):
        train_backbone(parse_config("", argv(datasets["a"], run_dir, "--max_iters", "15")))


@pytest.mark.parametrize("embed_dim, router_hidden, widths", [
    (256, None, "1024,1024,1024,512"), (128, None, "512,512,512,256"), (128, "64, 32", "64,32")])
def test_router_widths_are_tied_to_the_model_width_unless_given(embed_dim, router_hidden, widths):
    config = Config(embed_dim=embed_dim, router_hidden=router_hidden)
    assert config.model_fields()["router_hidden"] == widths
    expected = [int(width) for width in widths.split(",")]
    mixture = ExpertMixture(4, embed_dim, 0.0, routed=True,
                            router_hidden=tuple(expected) if router_hidden else None)
    linears = [module for module in mixture.router.network if isinstance(module, torch.nn.Linear)]
    assert [linear.out_features for linear in linears] == [*expected, 4] and linears[0].in_features == embed_dim


def test_a_finished_grouping_is_not_replaced_unasked_and_a_run_keeps_its_seed(datasets, stage1_run, tmp_path, capsys):
    """A grouping with another --seed overwrote the group file that experts were trained on; stages 2 and 3 with
    another --seed than stage 1's ran on the run, mixing seeds."""
    run_dir = tmp_path / "run"
    shutil.copytree(stage1_run, run_dir)
    groups = run_dir / "stage2" / "groups_random_2.json"
    before = groups.read_bytes()
    with pytest.raises(ArtifactError, match=r"backbone.safetensors: trained with --seed 0, this stage has --seed 3; "
                                            r"pass --seed 0, or another --run_dir for seed 3$"):
        group_tasks(parse_config("", argv(datasets["a"], run_dir, "--seed", "3")), "random")
    for stage in (train_experts, train_router):
        with pytest.raises(ArtifactError, match="trained with --seed 0, this stage has --seed 3"):
            stage(parse_config("", argv(datasets["a"], run_dir, "--seed", "3", "--all")))
    # the same seed, another option of the grouping: refused without --restart (the file is kept), replaced with it
    manifest = run_dir / "stage2" / "groups_random_2.manifest.json"
    recorded = json.loads(manifest.read_text())
    recorded["identity"]["seed"] = 7  # as if grouped with --seed 7 on this seed-0 run before the seed check
    manifest.write_text(json.dumps(recorded))
    with pytest.raises(ArtifactError, match=r"groups_random_2.json: made with other settings: --seed 7 -> 0; --restart "
                                            r"replaces it"):
        group_tasks(parse_config("", argv(datasets["a"], run_dir)), "random")
    assert groups.read_bytes() == before
    group_tasks(parse_config("", argv(datasets["a"], run_dir, "--restart")), "random")
    assert "wrote" in capsys.readouterr().out


def test_a_damaged_artifact_is_neither_finished_nor_read(datasets, stage1_run, tmp_path, capsys):
    """A truncated backbone was "already finished", and a grouping read it; only the evaluator noticed."""
    run_dir = tmp_path / "run"
    shutil.copytree(stage1_run, run_dir)
    backbone = run_dir / "stage1" / "backbone.safetensors"
    whole = backbone.read_bytes()
    backbone.write_bytes(whole[:10_000])  # the header whole, the tensors cut
    with pytest.raises(ArtifactError, match=rf"backbone.safetensors: stage-1 backbone is damaged \(10000 bytes where its "
                                            rf"header says {len(whole)}\); run the stage that writes it again"):
        group_tasks(parse_config("", argv(datasets["a"], run_dir, "--restart")), "random")
    capsys.readouterr()
    train_backbone(parse_config("", argv(datasets["a"], run_dir, "--max_iters", "10")))
    assert f"{backbone}: damaged (10000 bytes where its header says {len(whole)}); writing it again" in (
        capsys.readouterr().out)
    assert backbone.read_bytes() == whole  # from the checkpoint of its last step, bit for bit
    header = int.from_bytes(whole[:8], "little")
    for content, damage in [(whole, ""), (whole[:1000], f"1000 bytes, fewer than its header's {header}"),
                            (b"hello", "5 bytes, shorter than a safetensors header"),
                            (b"\x02" + bytes(7) + b"{]", "its header is not a safetensors header")]:
        backbone.write_bytes(content)
        assert safetensors_damage(backbone) == damage


def test_a_restart_cut_short_is_resumed_not_taken_for_the_run_it_replaces(datasets, stage1_run, tmp_path,
                                                                           monkeypatch, capsys):
    """Killed during --restart, the rerun without --restart said "already finished" with the old model (and the
    old run's metrics gone); the interrupted line told to rerun the same command, which starts over again."""
    import m3dt.train

    run_dir = tmp_path / "run"
    shutil.copytree(stage1_run, run_dir)
    backbone = run_dir / "stage1" / "backbone.safetensors"
    saves = []
    save = m3dt.train.save_train_state

    def cut_after_the_first_checkpoint(*arguments):
        if saves:
            raise KeyboardInterrupt
        saves.append(save(*arguments))

    monkeypatch.setattr(m3dt.train, "save_train_state", cut_after_the_first_checkpoint)
    with pytest.raises(KeyboardInterrupt, match=r"stopped at step \d+ of 10; rerun it without --restart to resume "
                                                r"from step 5"):
        train_backbone(parse_config("", argv(datasets["a"], run_dir, "--max_iters", "10", "--restart")))
    assert "--restart: removed 1 earlier artifact(s)" in capsys.readouterr().out and not backbone.exists()
    monkeypatch.setattr(m3dt.train, "save_train_state", save)
    train_backbone(parse_config("", argv(datasets["a"], run_dir, "--max_iters", "10")))
    assert "resuming from step 5" in capsys.readouterr().out
    assert json.loads((run_dir / "stage1" / "backbone.manifest.json").read_text())["steps_done"] == 10
    # "already finished" says the steps the file holds, not the --max_iters asked for
    train_backbone(parse_config("", argv(datasets["a"], run_dir, "--max_iters", "3")))
    assert "stage 1 already finished (10 steps)" in capsys.readouterr().out
