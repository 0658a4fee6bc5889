import metaworld
import numpy as np
import pytest
from metaworld.policies import ENV_POLICY_MAP

from m3dt.envs import make_env
from m3dt.envs.metaworld import mt1_benchmark, scripted_policy, v3_name
from m3dt.tasks import get_task, task_table
from tests.env_checks import assert_dataset_layout, random_rollout_observations, state_stats

METAWORLD_TASKS = [task.name for task in task_table().values() if task.family == "metaworld"]
GOAL = slice(36, 39)  # the goal xyz closes the 39-d observation


def test_table_has_50_tasks_each_with_a_v3_env_and_expert():
    assert len(METAWORLD_TASKS) == 50
    for name in METAWORLD_TASKS:
        assert v3_name(name) in metaworld.MT1.ENV_NAMES
        assert v3_name(name) in ENV_POLICY_MAP


@pytest.mark.parametrize("task_name", METAWORLD_TASKS)
def test_observation_follows_dataset_layout(task_name):
    task = get_task(task_name)
    assert (task.obs_dim, task.act_dim, task.horizon) == (39, 4, 500)
    observations = random_rollout_observations(task, episodes=(0, 1))
    assert_dataset_layout(task, observations)
    # The goal is observed: a goal coordinate that the dataset's goals spread over (std > 1 cm) differs
    # between two goals here. (Spreads under 1 cm are not goal sampling: v3 holds those coordinates fixed.)
    goal_dims = np.arange(39)[GOAL]
    sampled = goal_dims[np.array(state_stats()[task_name]["state_std"])[goal_dims] > 0.01]
    assert (np.ptp(observations[:, sampled], axis=0) > 0).all()


def test_episodes_get_distinct_goals_repeatable_per_seed():
    goals = [make_env("reach-v2", episode, seed=0).reset()[GOAL] for episode in range(10)]
    assert len(np.unique(np.round(goals, 6), axis=0)) == 10

    same_episode = [make_env("reach-v2", 3, seed=0).reset() for _ in range(2)]
    np.testing.assert_array_equal(*same_episode)
    assert not np.array_equal(make_env("reach-v2", 3, seed=1).reset()[GOAL], goals[3])


def test_mt1_is_built_once_per_task_and_seed():
    make_env("push-v2", 0, seed=5)
    hits = mt1_benchmark.cache_info().hits
    make_env("push-v2", 1, seed=5)
    assert mt1_benchmark.cache_info().hits == hits + 1


def test_episode_without_a_goal_is_refused():
    with pytest.raises(ValueError, match="no goal"):
        make_env("reach-v2", episode=50, seed=0)


def test_episode_lasts_the_full_horizon():
    env = make_env("reach-v2", 0, seed=0)
    env.reset()
    dones = [env.step(np.zeros(4))[2] for _ in range(500)]
    assert dones.index(True) == 499
    env.step(np.zeros(4))  # metaworld's own 500-step limit would raise here


# metaworld's experts warn when their gains saturate the [-1, 1] action, which is intended
@pytest.mark.filterwarnings("ignore:Constant\\(s\\) may be too high")
@pytest.mark.parametrize("task_name", ["reach-v2", "basketball-v2"])
def test_scripted_expert_succeeds(task_name):
    env = make_env(task_name, 0, seed=0)
    expert = scripted_policy(task_name)
    observation, done, succeeded = env.reset(), False, False
    while not (done or succeeded):
        action = expert(observation)
        assert action.shape == (4,) and np.abs(action).max() <= 1.0
        observation, _, done, info = env.step(action)
        succeeded = info["success"]
    assert succeeded, f"no success within {env.steps} steps"
