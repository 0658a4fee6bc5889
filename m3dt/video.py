"""Videos of evaluation rollouts: MuJoCo's offscreen renderer, the reset frame and one per env step, as MP4.

`python -m m3dt.evaluate ... --video K` records the first K episodes of every task into
`{run_dir}/eval/{label}/videos/{task}_episode{e}.mp4` (H.264 by the ffmpeg that ships in imageio-ffmpeg).

Rendering needs an OpenGL backend for MuJoCo (the MUJOCO_GL variable, read when mujoco is first imported):
EGL on a GPU machine, OSMesa (software, `apt-get install libosmesa6`, done by scripts/install.sh when run
as root) on a CPU. `choose_gl_backend` keeps a MUJOCO_GL the user set, else tries EGL when a GPU is visible
and OSMesa, each in a short probe process, and stops with one line when none renders. The env workers are
spawned after the choice, so they inherit it; in a process that imported mujoco before the choice (rollouts
in the evaluating process, `--workers 0`, after an import of the simulators), mujoco's GL module is
reloaded so that its renderers use the chosen backend.

Cameras: a family's own camera where it has one (Meta-World's front corner view, each DMC domain's first
camera); otherwise a camera that follows the robot's root body from the side (ant-dir, cheetah-vel,
gymnasium MuJoCo tasks).
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from m3dt.run import atomic_path
from m3dt.tasks import Task

if TYPE_CHECKING:  # names for the annotations only: importing m3dt.envs would set MUJOCO_GL
    import mujoco

    from m3dt.envs.base import TaskEnv

WIDTH, HEIGHT = 320, 240  # multiples of 16, so that the H.264 encoder needs no resizing
FRAMES_PER_SECOND = 30
FOLLOW_DISTANCE = 4.0  # metres from the tracked body (gymnasium's default view of Ant and HalfCheetah)
DISABLED = ("", "disable", "disabled", "off", "false", "0")


class VideoError(RuntimeError):
    """Videos cannot be rendered on this machine; the message says what to install."""


def video_path(folder: Path, task_name: str, episode: int) -> Path:
    return folder / f"{task_name}_episode{episode}.mp4"


def _probe(backend: str, answer) -> None:
    """Render one frame of a one-sphere model with `backend` (run in a fresh process: MuJoCo reads MUJOCO_GL
    once, at its first import)."""
    os.environ["MUJOCO_GL"] = backend
    os.environ["PYOPENGL_PLATFORM"] = backend
    try:
        import mujoco

        model = mujoco.MjModel.from_xml_string('<mujoco><worldbody><geom size=".1"/></worldbody></mujoco>')
        with mujoco.Renderer(model, 16, 16) as renderer:
            renderer.update_scene(mujoco.MjData(model))
            renderer.render()
        answer.send(None)
    except BaseException as error:  # a missing library surfaces as ImportError, OSError or a GL error
        answer.send(f"{type(error).__name__}: {' '.join(str(error).split())[:200]}")


def probe_backend(backend: str) -> str | None:
    """None when `backend` renders here, else why not."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_probe, args=(backend, sender))
    process.start()
    process.join(timeout=120)
    if receiver.poll():
        return receiver.recv()
    process.kill()
    return f"the probe process died or hung (exit code {process.exitcode})"


def choose_gl_backend(gpu: bool) -> str:
    """Pick MuJoCo's GL backend for the env workers and set MUJOCO_GL (and PYOPENGL_PLATFORM) to it.

    A MUJOCO_GL set by the user is kept (and must render); otherwise EGL when `gpu`, then OSMesa.
    Raises VideoError with every backend's failure when none renders.
    """
    chosen = os.environ.get("MUJOCO_GL", "").lower().strip()
    candidates = [chosen] if chosen not in DISABLED else [*(["egl"] if gpu else []), "osmesa"]
    failures = []
    for backend in candidates:
        failure = probe_backend(backend)
        if failure is None:
            os.environ["MUJOCO_GL"] = backend
            os.environ["PYOPENGL_PLATFORM"] = backend
            gl_module = sys.modules.get("mujoco.gl_context")  # read MUJOCO_GL when it was imported
            if gl_module is not None and getattr(gl_module, "_MUJOCO_GL", None) != backend:
                importlib.reload(gl_module)
            return backend
        failures.append(f"MUJOCO_GL={backend}: {failure}")
    raise VideoError("cannot render videos (" + "; ".join(failures) + "): on a CPU install OSMesa "
                     "(apt-get install libosmesa6; scripts/install.sh does it when run as root), on a GPU "
                     "EGL (libegl1), or set MUJOCO_GL to a backend that works")


def follow_camera(model: mujoco.MjModel, body: int = 1) -> mujoco.MjvCamera:
    """A camera that tracks `body` (the root body of a robot) from the side."""
    import mujoco

    camera = mujoco.MjvCamera()
    camera.type = mujoco.mjtCamera.mjCAMERA_TRACKING
    camera.trackbodyid = body
    camera.distance = FOLLOW_DISTANCE
    camera.elevation = -20.0
    camera.azimuth = 90.0
    return camera


class RecordedEnv:
    """An env (the TaskEnv contract) that renders a frame after every reset and step into an MP4 at `path`.
    The file is written to a temporary name and renamed when the env is closed after its rollout ran to
    the end; `abandon` (a failed or interrupted evaluation) deletes it, so a video on disk is always complete."""

    def __init__(self, env: TaskEnv, path: Path):
        import imageio_ffmpeg
        import mujoco

        self.env = env
        model, _ = env.physics()
        self.renderer = mujoco.Renderer(model, HEIGHT, WIDTH)
        # Shadows and reflections cost most of a frame in software OpenGL (Meta-World: 656 -> 178 ms measured
        # on a loaded 2-core CPU); the scene reads as well without them.
        self.renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        self.renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        self.camera = env.camera()
        if self.camera is None:
            self.camera = follow_camera(model)
        self.files = ExitStack()
        temporary = self.files.enter_context(atomic_path(Path(path)))
        # -f mp4: ffmpeg would otherwise guess the container from the temporary name's suffix.
        self.writer = imageio_ffmpeg.write_frames(str(temporary), (WIDTH, HEIGHT), fps=FRAMES_PER_SECOND,
                                                  codec="libx264", output_params=["-f", "mp4"])
        self.writer.send(None)  # start ffmpeg

    @property
    def task(self) -> Task:
        return self.env.task

    @property
    def episode(self) -> int:
        return self.env.episode

    def frame(self) -> np.ndarray:
        """The current state as an RGB image (HEIGHT, WIDTH, 3) uint8."""
        _, data = self.env.physics()  # asked each time: an env may rebuild its data on reset
        self.renderer.update_scene(data, camera=self.camera)
        return self.renderer.render()

    def reset(self) -> np.ndarray:
        observation = self.env.reset()
        self.writer.send(np.ascontiguousarray(self.frame()))
        return observation

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, dict]:
        result = self.env.step(action)
        self.writer.send(np.ascontiguousarray(self.frame()))
        return result

    def close(self) -> None:
        self.writer.close()  # ffmpeg finishes the file
        self.files.close()  # renamed into place
        self.renderer.close()
        self.env.close()

    def abandon(self) -> None:
        """Close without keeping the video: the rollout did not run to its end."""
        self.writer.close()
        unfinished = RuntimeError("the rollout did not finish")
        self.files.__exit__(type(unfinished), unfinished, None)  # atomic_path deletes the temporary file
        self.renderer.close()
        self.env.close()


def make_recorded_env(task: str | Task, episode: int, seed: int, path: Path | None) -> TaskEnv | RecordedEnv:
    """make_env, wrapped in a RecordedEnv when `path` is given."""
    from m3dt.envs import make_env

    env = make_env(task, episode, seed)
    return env if path is None else RecordedEnv(env, path)
