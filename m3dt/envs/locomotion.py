"""ant-dir (40 goal directions) and cheetah-vel (40 target velocities), as the Prompt-DT env package defines
them (mxu34/prompt-dt, tp_envs/), rebuilt on gymnasium's MuJoCo models.

The MuJoCo model and stepping come from gymnasium's Ant-v5 / HalfCheetah-v5 (the same ant.xml and
half_cheetah.xml as Prompt-DT's mujoco-py envs, up to visual sites). Reward, termination, observation and
reset noise are computed here, per the Prompt-DT definitions:

- timing: frame skip 5 on a 0.01 s MuJoCo timestep, so dt = 0.05 s for both, as in Prompt-DT (gymnasium's
  defaults are the same, so nothing is overridden).
- ant-dir: reward = torso xy velocity . (cos g, sin g) - 0.5 |a|^2 - contact cost + 1, where the velocity is
  the torso body's position difference over dt and the contact cost is 0.5e-3 * sum(clip(cfrc_ext, -1, 1)^2);
  the episode ends when the state is not finite or the torso height qpos[2] leaves [0.2, 1.0];
  obs (27) = qpos[2:] + qvel.
- cheetah-vel: reward = -|v - v_goal| - 0.05 |a|^2 with v the root x joint's difference over dt; never ends
  early; obs (20) = qpos[1:] + qvel + the torso body's position (what Prompt-DT calls its com).
- reset: qpos += U(-0.1, 0.1), qvel += 0.1 N(0, 1), from an RNG seeded with (seed, episode).

One known difference: Prompt-DT pins mujoco-py 2.0.2.13, whose step leaves cfrc_ext at 0 (MuJoCo 2.0 only
computes it on request; openai/gym#1541), so its contact cost was 0 in practice. gymnasium requests the
contact forces after every step, so here the cost is the written one; under random actions it averages
~1e-3 per step (at most 0.042), i.e. well under 1 return unit per 200-step episode.
"""

from __future__ import annotations

import mujoco
import numpy as np
from gymnasium.envs.mujoco.ant_v5 import AntEnv
from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv

from m3dt.envs.base import Physics, TaskEnv
from m3dt.tasks import Task

RESET_NOISE_SCALE = 0.1
ANT_HEALTHY_Z_RANGE = (0.2, 1.0)  # torso height outside this range (fallen over or jumping) ends the episode
ANT_CONTROL_COST = 0.5
ANT_CONTACT_COST = 0.5e-3
ANT_SURVIVE_REWARD = 1.0
CHEETAH_CONTROL_COST = 0.05


def ant_dir_reward(
    xy_velocity: np.ndarray, goal_angle: float, action: np.ndarray, contact_forces: np.ndarray
) -> float:
    """ant-dir reward: progress along the goal direction, minus control and contact costs, plus survival."""
    direction = np.array([np.cos(goal_angle), np.sin(goal_angle)])
    control_cost = ANT_CONTROL_COST * np.sum(np.square(action))
    contact_cost = ANT_CONTACT_COST * np.sum(np.square(np.clip(contact_forces, -1.0, 1.0)))
    return float(xy_velocity @ direction - control_cost - contact_cost + ANT_SURVIVE_REWARD)


def cheetah_vel_reward(forward_velocity: float, goal_velocity: float, action: np.ndarray) -> float:
    """cheetah-vel reward: distance to the target forward velocity, minus a control cost."""
    return float(-abs(forward_velocity - goal_velocity) - CHEETAH_CONTROL_COST * np.sum(np.square(action)))


class LocomotionEnv(TaskEnv):
    """An ant-dir or cheetah-vel task. `goal` (direction in rad, or target velocity) overrides the task's
    goal, so that a goal-conditioned data collector can reuse the env; it may also be reassigned between
    episodes through the `goal` attribute."""

    def __init__(self, task: Task, episode: int, seed: int, goal: float | None = None):
        super().__init__(task, episode, seed)
        self.goal = task.goal if goal is None else goal
        self.is_ant = task.family == "ant_dir"
        # The gymnasium env only holds the MuJoCo model/data and steps them; `sim.data` is public for checks.
        self.sim = AntEnv(include_cfrc_ext_in_observation=False) if self.is_ant else HalfCheetahEnv()
        # One stream per (seed, episode): the k-th reset of such an env is always the same.
        self._rng = np.random.default_rng([seed, episode])

    def _reset(self) -> np.ndarray:
        sim = self.sim
        qpos = sim.init_qpos + self._rng.uniform(-RESET_NOISE_SCALE, RESET_NOISE_SCALE, sim.model.nq)
        qvel = sim.init_qvel + RESET_NOISE_SCALE * self._rng.standard_normal(sim.model.nv)
        mujoco.mj_resetData(sim.model, sim.data)  # clear time, controls and warm starts of the last episode
        sim.set_state(qpos, qvel)
        return self._observation()

    def _step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, dict]:
        position_before = self._tracked_position()
        self.sim.do_simulation(action, self.sim.frame_skip)
        velocity = (self._tracked_position() - position_before) / self.sim.dt
        if self.is_ant:
            reward = ant_dir_reward(velocity, self.goal, action, self.sim.data.cfrc_ext)
            return self._observation(), reward, not self._ant_is_healthy(), {}
        return self._observation(), cheetah_vel_reward(velocity[0], self.goal, action), False, {}

    def _tracked_position(self) -> np.ndarray:
        """The position whose rate the reward uses, as in Prompt-DT: the torso body's xy for the ant (as
        MuJoCo last computed it, i.e. before the final substep's integration), the root x joint for the
        cheetah."""
        data = self.sim.data
        return data.body("torso").xpos[:2].copy() if self.is_ant else data.qpos[:1].copy()

    def _ant_is_healthy(self) -> bool:
        state = np.concatenate([self.sim.data.qpos, self.sim.data.qvel])
        low, high = ANT_HEALTHY_Z_RANGE
        return bool(np.isfinite(state).all() and low <= state[2] <= high)

    def _observation(self) -> np.ndarray:
        data = self.sim.data
        if self.is_ant:
            return np.concatenate([data.qpos[2:], data.qvel])
        return np.concatenate([data.qpos[1:], data.qvel, data.body("torso").xpos])

    def physics(self) -> Physics:
        return self.sim.model, self.sim.data

    def close(self) -> None:
        """Close the gymnasium MuJoCo env underneath."""
        self.sim.close()
