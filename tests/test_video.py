"""Videos of evaluation rollouts: one short episode of a task of each MT160 family through m3dt.evaluate
--video, decoded back frame by frame and linked from the report (a gymnasium task's video: test_task_table);
and the one-line error when no GL backend renders."""

import importlib

import imageio_ffmpeg
import numpy as np
import pytest
import torch

from m3dt import video
from m3dt.evaluate import evaluate
from m3dt.evaluate import main as evaluate_main
from m3dt.report import build_report
from m3dt.stages import run_cli, train_backbone
from tests.test_pipeline import TINY

ONE_PER_FAMILY = ["reach-v2", "walker-walk", "ant-dir-2", "cheetah-vel-8"]
STEPS = 8


@pytest.fixture(scope="module")
def tiny_run(small_data, tmp_path_factory):
    """A stage-1 backbone of 2 steps: evaluation needs a run directory; what it learned does not matter."""
    run_dir = tmp_path_factory.mktemp("video_run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run_cli(train_backbone, "stage 1", [*TINY, "--tasks", ",".join(ONE_PER_FAMILY), "--data_path", str(small_data),
                                        "--run_dir", str(run_dir), "--max_iters", "2"])
    torch.set_num_threads(threads)
    return run_dir


def test_one_episode_video_per_family(tiny_run, monkeypatch):
    monkeypatch.setenv("MUJOCO_GL", "disable")  # as scripts/env.sh sets it: the evaluator picks a backend itself
    monkeypatch.setenv("PYOPENGL_PLATFORM", "")
    results = evaluate(str(tiny_run), "random", episodes=2, max_steps=STEPS, workers=2, video=1)
    (folder,) = (tiny_run / "eval").iterdir()  # random, labelled with the shortened protocol
    assert results["videos"] == {name: [f"videos/{name}_episode0.mp4"] for name in ONE_PER_FAMILY}
    assert "[walker-walk_episode0](videos/walker-walk_episode0.mp4)" in (folder / "table.md").read_text()
    for name in ONE_PER_FAMILY:
        reader = imageio_ffmpeg.read_frames(str(folder / "videos" / f"{name}_episode0.mp4"))
        metadata = next(reader)
        assert metadata["size"] == (video.WIDTH, video.HEIGHT)
        frames = [np.frombuffer(frame, np.uint8).reshape(video.HEIGHT, video.WIDTH, 3) for frame in reader]
        assert len(frames) == STEPS + 1  # the reset, then one per step
        assert all(frame.std() > 10 for frame in frames)  # a scene, not a blank image
        assert not (folder / "videos" / f"{name}_episode1.mp4").exists()
    report = build_report([tiny_run], tiny_run / "report")
    assert f"{folder.name}: [ant-dir-2_episode0](../eval/{folder.name}/videos/ant-dir-2_episode0.mp4)" in report


def test_no_gl_backend_is_one_line(tiny_run, monkeypatch, capsys):
    monkeypatch.setenv("MUJOCO_GL", "osmesa")
    monkeypatch.setattr(video, "probe_backend", lambda backend: "OSError: libOSMesa.so.8: cannot open shared object")
    with pytest.raises(SystemExit) as exited:
        evaluate_main(["--run_dir", str(tiny_run), "--stage", "random", "--video", "1", "--max_steps", "1"])
    error = capsys.readouterr().err
    assert exited.value.code == 2 and error.count("\n") == 1
    assert "cannot render videos (MUJOCO_GL=osmesa: OSError: libOSMesa.so.8" in error and "libosmesa6" in error


@pytest.mark.parametrize("workers", [0, 1])
def test_an_evaluation_that_fails_keeps_no_cut_video(tiny_run, monkeypatch, workers):
    """A rollout stopped by an error (or Ctrl-C) before its end: its video is deleted, not kept cut short. With
    workers=0 the frames are rendered in this process, where mujoco was imported before the backend was chosen
    (as by an earlier test): its GL module is reloaded with the chosen backend, so steps 0-2 render."""
    import mujoco.gl_context

    from m3dt.evaluate import RandomPolicy

    monkeypatch.setenv("MUJOCO_GL", "disable")
    monkeypatch.setenv("PYOPENGL_PLATFORM", "")
    importlib.reload(mujoco.gl_context)  # as imported under MUJOCO_GL=disable, whatever ran before (a reload
    monkeypatch.delattr(mujoco.gl_context, "GLContext", raising=False)  # keeps names an earlier import defined)
    draw = RandomPolicy.__call__

    def fails_at_step_3(self, history, live, t):
        if t == 3:
            raise RuntimeError("policy failed at step 3")
        return draw(self, history, live, t)

    monkeypatch.setattr(RandomPolicy, "__call__", fails_at_step_3)
    with pytest.raises(RuntimeError, match="policy failed at step 3"):
        evaluate(str(tiny_run), "random", tasks="reach-v2", episodes=1, max_steps=STEPS + 1, workers=workers, video=1)
    folders = [folder for folder in (tiny_run / "eval").iterdir() if folder.name.endswith(f"steps{STEPS + 1}")]
    assert all(not list(folder.glob("**/*.mp4")) and not list(folder.glob("**/.*.tmp")) for folder in folders)
