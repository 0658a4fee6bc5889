"""Sampler invariants: padding values, prompt rows and window, normalisation, RTG scale."""

import numpy as np
import pytest
import torch

from m3dt.data import PAD_ACTION, DataError, DeviceSampler, TaskDataset, load_episode, returns_to_go
from m3dt.tasks import get_task
from tests.conftest import SMALL_TASKS


@pytest.fixture(scope="module")
def dataset(small_data):
    return TaskDataset(small_data, SMALL_TASKS, prompt_length=5)


@pytest.fixture(scope="module")
def sampler(dataset):
    return DeviceSampler(dataset, context_length=20, batch_size=16, device=torch.device("cpu"), seeds=[0])


def test_training_files_exclude_prompts(dataset, small_data):
    # 6 files per task: 4 training episodes, the last two are prompts
    for task_index, task in enumerate(SMALL_TASKS):
        lengths = [load_episode(small_data / task / f"{i}.npz").rewards.shape[0] for i in range(4)]
        assert dataset.task_sizes[task_index] == sum(lengths)


def test_state_statistics_are_per_task_over_training_states(dataset, small_data):
    task = SMALL_TASKS[2]
    states = np.concatenate([load_episode(small_data / task / f"{i}.npz").observations for i in range(4)])
    np.testing.assert_allclose(dataset.state_mean[2], states.mean(axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dataset.state_std[2], states.std(axis=0) + 1e-6, rtol=1e-5, atol=1e-5)


def test_padding_values_and_mask(sampler, dataset):
    torch.manual_seed(0)
    for task_index in range(len(SMALL_TASKS)):
        batch = sampler.sample(torch.tensor([task_index]))
        padded = batch.mask == 0
        mean = torch.from_numpy(dataset.state_mean[task_index])
        std = torch.from_numpy(dataset.state_std[task_index])
        # padded positions: state 0 before normalising, action -10, rtg 0, timestep 0
        expected_state = (-mean / std).expand_as(batch.states)
        assert torch.allclose(batch.states[padded], expected_state[padded])
        assert (batch.actions[padded] == PAD_ACTION).all()
        assert (batch.returns_to_go[padded] == 0).all()
        assert (batch.timesteps[padded] == 0).all()
        # padding is on the left: once a row is valid it stays valid
        assert (batch.mask[:, 1:] >= batch.mask[:, :-1]).all()


def test_left_padding_happens_at_episode_ends(sampler):
    # with 40-step episodes and K=20, about half of the starts fall in the last 19 steps
    batches = [sampler.sample(torch.tensor([0])) for _ in range(30)]
    padded_share = np.mean([(batch.mask == 0).any(dim=1).float().mean().item() for batch in batches])
    assert 0.2 < padded_share < 0.7
    assert batches[0].mask.shape == (16, 20)


def test_segments_match_the_data(sampler, dataset, small_data):
    """Every valid step of a sampled segment is a consecutive run of one episode, with its own RTG."""
    task_index = 1
    task = get_task(SMALL_TASKS[task_index])
    episodes = [load_episode(small_data / task.name / f"{i}.npz") for i in range(4)]
    batch = sampler.sample(torch.tensor([task_index]))
    mean = torch.from_numpy(dataset.state_mean[task_index])
    std = torch.from_numpy(dataset.state_std[task_index])
    for row in range(16):
        valid = batch.mask[row] == 1
        states = batch.states[row][valid] * std + mean
        start = int(batch.timesteps[row][valid][0])
        match = [e for e in episodes if e.observations.shape[0] > start
                 and np.allclose(e.observations[start], states[0].numpy(), atol=1e-4)]
        assert match, "segment start not found in any episode"
        episode = match[0]
        count = int(valid.sum())
        np.testing.assert_allclose(states.numpy(), episode.observations[start : start + count], atol=1e-4)
        rtg = returns_to_go(episode.rewards)[start : start + count] / task.rtg_scale
        np.testing.assert_allclose(batch.returns_to_go[row][valid, 0].numpy(), rtg, rtol=1e-5)
        assert (batch.timesteps[row][valid] == torch.arange(start, start + count)).all()


def test_prompt_rows_and_window(sampler, dataset, small_data):
    task_index = 3
    task = get_task(SMALL_TASKS[task_index])
    prompt_episodes = [load_episode(small_data / task.name / f"{i}.npz") for i in (4, 5)]
    low, high = sorted(prompt_episodes, key=lambda episode: episode.rewards.sum())
    batch = sampler.sample(torch.tensor([task_index]))
    all_states = np.concatenate([e.observations for e in prompt_episodes])
    mean, std = all_states.mean(axis=0), all_states.std(axis=0) + 1e-6
    for row in range(16):
        episode = low if row in (0, 2) else high
        steps = episode.rewards.shape[0]
        window = slice(steps - 6, steps - 1)  # steps T-6 .. T-2
        np.testing.assert_allclose(batch.prompt_actions[row].numpy(), episode.actions[window])
        np.testing.assert_allclose(batch.prompt_states[row].numpy(), (episode.observations[window] - mean) / std,
                                   rtol=1e-4, atol=1e-4)
        rtg = returns_to_go(episode.rewards)[window] / task.rtg_scale
        np.testing.assert_allclose(batch.prompt_returns_to_go[row, :, 0].numpy(), rtg, rtol=1e-5)
        assert (batch.prompt_timesteps[row] == torch.arange(steps - 6, steps - 1)).all()
        assert (batch.prompt_mask[row] == 1).all()


def test_action_mask_covers_true_action_dims(sampler):
    for task_index, name in enumerate(SMALL_TASKS):
        batch = sampler.sample(torch.tensor([task_index]))
        assert int(batch.action_mask[0, 0].sum()) == get_task(name).act_dim


def test_sampling_is_proportional_to_length(tmp_path):
    """A 10-step and a 30-step episode: starts fall in the long one three times as often."""
    from m3dt.synthetic import write_episode

    folder = tmp_path / "reach-v2"
    folder.mkdir()
    for index, length in enumerate([10, 30, 8, 8]):
        observations = np.zeros((length, 39), np.float32)
        observations[:, 0] = index  # marks the episode
        write_episode(folder / f"{index}.npz", observations, np.zeros((length, 8), np.float32), np.ones(length, np.float32))
    dataset = TaskDataset(tmp_path, ["reach-v2"])
    sampler = DeviceSampler(dataset, 20, 16, torch.device("cpu"), seeds=[1])
    picks = []
    for _ in range(400):
        batch = sampler.sample(torch.tensor([0]))
        last = batch.states[:, -1, 0] * float(dataset.state_std[0, 0]) + float(dataset.state_mean[0, 0])
        picks.append(last.round())
    share_long = (torch.cat(picks) == 1).float().mean().item()
    assert 0.7 < share_long < 0.8  # expected 0.75


def test_worker_processes_read_the_same_dataset(dataset, small_data):
    parallel = TaskDataset(small_data, SMALL_TASKS, prompt_length=5, workers=2)
    for name in ("observations", "actions", "returns_to_go", "episode_starts", "task_offsets", "state_mean", "state_std"):
        np.testing.assert_array_equal(getattr(parallel, name), getattr(dataset, name))
    for key, value in dataset.prompts.items():
        np.testing.assert_array_equal(parallel.prompts[key], value)


def test_missing_task_folder_is_a_clear_error(small_data):
    with pytest.raises(DataError, match="walker-run: task folder does not exist"):
        TaskDataset(small_data, ["walker-run"])


@pytest.mark.device
def test_both_data_placements_give_the_same_batches(dataset, device):
    """The dataset on the training device and in host memory (batches gathered there and copied) give the
    same batches bit for bit from the same seeds, and so does a sampler resumed from the other's state
    (on a CPU both placements are the host; scripts/gpu_check.sh runs this with the data on a GPU)."""
    on_device, on_host = (DeviceSampler(dataset, 20, 16, device, seeds=[3, 4], data_device=place)
                          for place in (device, torch.device("cpu")))
    for step in range(4):
        tasks = torch.tensor([step % 6, (step + 2) % 6])
        first, second = on_device.sample(tasks.to(on_device.data_device)), on_host.sample(tasks)
        for key, value in vars(first).items():
            assert value.device.type == device.type and getattr(second, key).device.type == device.type
            assert torch.equal(value, getattr(second, key)), key
