import mujoco
import numpy as np
import pytest

from m3dt.envs import make_env
from m3dt.envs.locomotion import LocomotionEnv
from m3dt.tasks import get_task, task_table
from tests.env_checks import assert_dataset_layout, random_rollout_observations

LOCOMOTION_TASKS = [task.name for task in task_table().values() if task.family in ("ant_dir", "cheetah_vel")]
DT = 0.05  # Prompt-DT: frame skip 5 on a 0.01 s timestep


def native_observation(env: LocomotionEnv) -> np.ndarray:
    """The observation recomputed from the simulator state in the dataset's layout."""
    data = env.sim.data
    if env.is_ant:
        return np.concatenate([data.qpos[2:], data.qvel])
    return np.concatenate([data.qpos[1:], data.qvel, data.body("torso").xpos])


@pytest.mark.parametrize("task_name", LOCOMOTION_TASKS)
def test_observation_follows_dataset_layout(task_name):
    task = get_task(task_name)
    expected_dims = {"ant_dir": (27, 8), "cheetah_vel": (20, 6)}[task.family]
    assert (task.obs_dim, task.act_dim, task.horizon) == (*expected_dims, 200)
    assert_dataset_layout(task, random_rollout_observations(task))


def test_goal_comes_from_task_table_or_override():
    assert make_env("ant-dir-7").goal == get_task("ant-dir-7").goal
    assert make_env("cheetah-vel-12").goal == get_task("cheetah-vel-12").goal
    assert LocomotionEnv(get_task("cheetah-vel-12"), 0, 0, goal=2.5).goal == 2.5


def test_simulator_timing_matches_prompt_dt():
    for task_name in ("ant-dir-0", "cheetah-vel-0"):
        sim = make_env(task_name).sim
        assert sim.frame_skip == 5 and sim.dt == pytest.approx(DT)


def test_reset_noise_depends_on_seed_and_episode_only():
    first = make_env("ant-dir-3", episode=4, seed=1).reset()
    np.testing.assert_array_equal(first, make_env("ant-dir-3", episode=4, seed=1).reset())
    assert not np.array_equal(first, make_env("ant-dir-3", episode=5, seed=1).reset())
    assert not np.array_equal(first, make_env("ant-dir-3", episode=4, seed=2).reset())


def test_ant_dir_reward_and_observation_by_hand():
    env = make_env("ant-dir-5")
    env.reset()
    action = np.random.default_rng(0).uniform(-1, 1, 8)
    torso_before = env.sim.data.body("torso").xpos[:2].copy()
    observation, reward, _, _ = env.step(action)
    velocity = (env.sim.data.body("torso").xpos[:2] - torso_before) / DT
    direction = np.array([np.cos(env.goal), np.sin(env.goal)])
    contact_cost = 0.5e-3 * np.sum(np.clip(env.sim.data.cfrc_ext, -1, 1) ** 2)
    expected = velocity @ direction - 0.5 * np.sum(action**2) - contact_cost + 1.0
    assert reward == pytest.approx(expected, rel=1e-9)
    np.testing.assert_allclose(observation[:27], native_observation(env), rtol=1e-6)


@pytest.mark.parametrize("vertical_velocity", [0.0, 6.0])
def test_ant_dir_ends_when_torso_leaves_height_range(vertical_velocity):
    """Without contacts the ant falls through the floor (or, thrown up, rises above 1 m): the episode must
    end on the first step whose torso height is outside [0.2, 1.0], and not before."""
    env = make_env("ant-dir-0")
    env.reset()
    env.sim.model.opt.disableflags |= mujoco.mjtDisableBit.mjDSBL_CONTACT
    qvel = np.zeros(env.sim.model.nv)
    qvel[2] = vertical_velocity
    env.sim.set_state(env.sim.data.qpos.copy(), qvel)
    for _ in range(50):
        _, _, done, _ = env.step(np.zeros(8))
        height = env.sim.data.qpos[2]
        assert done == (not 0.2 <= height <= 1.0)
        if done:
            break
    assert done and env.steps < env.task.horizon


def test_cheetah_vel_reward_and_observation_by_hand():
    goal_velocity = 1.7  # a goal that no task has, through the collector's override
    env = LocomotionEnv(get_task("cheetah-vel-5"), episode=0, seed=0, goal=goal_velocity)
    env.reset()
    action = np.random.default_rng(0).uniform(-1, 1, 6)
    x_before = env.sim.data.qpos[0]
    observation, reward, _, _ = env.step(action)
    forward_velocity = (env.sim.data.qpos[0] - x_before) / DT
    expected = -abs(forward_velocity - goal_velocity) - 0.05 * np.sum(action**2)
    assert reward == pytest.approx(expected, rel=1e-9)
    np.testing.assert_allclose(observation[:20], native_observation(env), rtol=1e-6)
    assert observation[18] == 0.0  # the torso never leaves the x-z plane


def test_cheetah_vel_never_ends_early():
    env = make_env("cheetah-vel-39")
    env.reset()
    rng = np.random.default_rng(0)
    dones = [env.step(rng.uniform(-1, 1, 6))[2] for _ in range(200)]
    assert dones.index(True) == 199
