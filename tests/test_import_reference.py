"""Importing the authors' checkpoint files: files in each of their layouts, made from a model of ours through
the inverse mapping, come back element for element, the imported models act as the source model (float64),
evaluation and the later stages accept the run, and bad files stop with one line naming the file."""

import copy
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from m3dt.config import Config
from m3dt.data import Batch, DeviceSampler, TaskDataset
from m3dt.evaluate import evaluate, load_policy
from m3dt.import_reference import (conv1d_layout, expert_paths, export_backbone, export_expert, export_moe, main,
                                   reference_backbone_key)
from m3dt.model import ModelConfig, PromptDecisionTransformer
from m3dt.run import ArtifactError, RunDir, file_hash
from m3dt.stages import data_stats, expert_tensors, train_experts, train_router
from tests.conftest import SMALL_TASKS
from tests.test_model import random_batch

WIDTH, LAYERS, EXPERTS = 32, 2, 4
ROUTER_HIDDEN = "128,128,128,64"  # the reference's 4d, 4d, 4d, 2d at width 32
GROUPS = {"expert_0": SMALL_TASKS[:2], "expert_1": SMALL_TASKS[2:3], "expert_2": SMALL_TASKS[3:5],
          "expert_3": SMALL_TASKS[5:]}
MODEL_OPTIONS = ["--embed_dim", str(WIDTH), "--n_layer", str(LAYERS), "--n_head", "2", "--expert_num", str(EXPERTS),
                 "--tasks", ",".join(SMALL_TASKS), "--workers", "0"]


def stage_config(data: Path, run_dir: Path) -> Config:
    return Config(tasks=",".join(SMALL_TASKS), data_path=str(data), run_dir=str(run_dir), embed_dim=WIDTH,
                  n_layer=LAYERS, n_head=2, expert_num=EXPERTS, router_hidden=ROUTER_HIDDEN, device="cpu", workers=0)


def save_reference(path: Path, content) -> Path:
    """As the authors' code saves: torch.save of a state_dict (an OrderedDict) or of a dict of them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if all(isinstance(value, dict) for value in content.values()):
        content = {key: OrderedDict(value) for key, value in content.items()}
    torch.save(OrderedDict(content), path)
    return path


@pytest.fixture(scope="module")
def source_model() -> PromptDecisionTransformer:
    """Stage-3 model of ours with every tensor random (LayerNorms and biases included)."""
    model = PromptDecisionTransformer(ModelConfig(embed_dim=WIDTH, n_layer=LAYERS, n_head=2,
                                                  router_hidden=tuple(int(w) for w in ROUTER_HIDDEN.split(","))))
    model.install_experts(EXPERTS, routed=True)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def reference_files(source_model, tmp_path_factory) -> dict[str, Path]:
    """The source model in the authors' layouts and file names."""
    folder = tmp_path_factory.mktemp("authors")
    state = source_model.state_dict()
    files = {
        "backbone": save_reference(folder / "prompt_model_mt6_iter_400_seed0", export_backbone(state)),
        "moe": save_reference(folder / "moe__iter_300", export_moe(state, LAYERS)),
        "experts": folder / "experts",
        "groups": folder / "gradient_grouped_task_4_seed0.json",
    }
    for expert in range(EXPERTS):
        save_reference(files["experts"] / f"expert_{expert}_iter_200", export_expert(expert_tensors(source_model, expert)))
    files["groups"].write_text(json.dumps(GROUPS))
    return files


def import_argv(files: dict[str, Path], data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [*(f"--{name}={path}" for name, path in files.items()), *MODEL_OPTIONS, "--data_path", str(data),
            "--run_dir", str(run_dir), *extra]


@pytest.fixture(scope="module")
def imported(reference_files, small_data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("imported")
    main(import_argv(reference_files, small_data, run_dir))
    return run_dir


def test_every_imported_tensor_equals_its_source(imported, reference_files, source_model):
    run = RunDir(imported)
    state = source_model.state_dict()
    moe = load_file(run.moe("gradient", EXPERTS))
    assert moe.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(moe[key], value), key
    backbone = load_file(run.backbone)
    assert backbone.keys() == {key for key in state if ".expert_mixture." not in key}
    theirs = torch.load(reference_files["backbone"], weights_only=True)
    for key, value in backbone.items():
        their_key, conv1d = reference_backbone_key(key)
        assert torch.equal(value, state[key]) and torch.equal(conv1d_layout(theirs[their_key], conv1d), value), key
    # GPT-2's Conv1D is (in, out) with query, key, value side by side: column j of their c_attn is row j of our qkv
    c_attn = theirs["transformer.h.1.attn.c_attn.weight"]
    assert c_attn.shape == (WIDTH, 3 * WIDTH)
    assert torch.equal(c_attn[:, WIDTH : 2 * WIDTH], state["blocks.1.attention.qkv.weight"][WIDTH : 2 * WIDTH].T)
    for expert in range(EXPERTS):
        written = load_file(run.expert("gradient", EXPERTS, expert))
        source = expert_tensors(source_model, expert)
        assert written.keys() == source.keys() and all(torch.equal(written[k], source[k]) for k in source)
        their_expert = torch.load(reference_files["experts"] / f"expert_{expert}_iter_200", weights_only=True)
        assert torch.equal(their_expert["block_1"]["c_fc.weight"], source["blocks.1.up_weight"][0])  # not transposed
    assert json.loads(run.groups("gradient", EXPERTS).read_text()) == GROUPS


def test_imported_models_act_as_the_source_model_in_float64(imported, source_model):
    run = RunDir(imported)
    batch = Batch(**{key: value.double() if value.is_floating_point() else value
                     for key, value in vars(random_batch(5, padded=4)).items()})
    backbone_only = PromptDecisionTransformer(source_model.config)
    backbone_only.load_state_dict(load_file(run.backbone))  # strict: every key, nothing more
    sources = {1: backbone_only.double().eval(), 3: copy.deepcopy(source_model).double()}
    actions = {}
    for stage, source in sources.items():
        model, manifest = load_policy(run, stage, "gradient", EXPERTS)
        actions[stage] = model.double()(batch)
        assert torch.equal(actions[stage], source(batch)), stage
        assert actions[stage].std() > 0.05 and manifest["config"]["router_hidden"] == ROUTER_HIDDEN
    assert not torch.allclose(actions[1], actions[3])  # the experts and routers take part


def test_manifests_say_where_each_artifact_came_from(imported, reference_files, small_data):
    run = RunDir(imported)
    stage1 = json.loads((imported / "stage1" / "backbone.manifest.json").read_text())
    assert stage1["tasks"] == SMALL_TASKS and stage1["steps_done"] == 400
    assert stage1["source"]["sha256"] == file_hash(reference_files["backbone"])
    assert set(stage1["source"]["unused_keys"]) == {
        "predict_state.weight", "predict_state.bias", "predict_return.weight", "predict_return.bias",
        "transformer.wte.weight", *(f"transformer.h.{layer}.attn.{name}" for layer in range(LAYERS)
                                    for name in ("bias", "masked_bias"))}
    expert_2 = json.loads((run.experts_dir("gradient", EXPERTS) / "expert_2.manifest.json").read_text())
    assert expert_2["tasks"] == GROUPS["expert_2"] and expert_2["steps_done"] == 200
    assert expert_2["source"]["sha256"] == file_hash(reference_files["experts"] / "expert_2_iter_200")
    stage3 = json.loads((run.stage3("gradient", EXPERTS) / "moe.manifest.json").read_text())
    assert stage3["num_experts"] == EXPERTS and stage3["top_k"] == 0 and stage3["steps_done"] == 300
    assert stage3["source"]["sha256"] == file_hash(reference_files["moe"]) and len(stage3["inputs"]) == 2 + EXPERTS
    # the data statistics are stage 1's, computed from the same data
    sampler = DeviceSampler(TaskDataset(small_data, SMALL_TASKS), 20, 16, torch.device("cpu"), [0])
    expected = data_stats(sampler.state_mean, sampler.state_std, sampler.prompts)
    written = load_file(run.data_stats)
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected)


def test_evaluation_and_later_stages_accept_the_import(imported, small_data, capsys):
    results = evaluate(str(imported), "3", "gradient", EXPERTS, tasks="cheetah-vel-8", episodes=1, max_steps=3,
                       workers=0, device="cpu")
    assert results["tasks"]["cheetah-vel-8"]["episodes"] == 1 and np.isfinite(results["total"]["score"])
    # the stages check the imported manifests (model fields, input hashes) and find the artifacts trained
    config = Config(**{**vars(stage_config(small_data, imported)), "max_iters": 100})
    train_experts(Config(**{**vars(config), "all": True}))
    train_router(config)
    out = capsys.readouterr().out
    assert "stage 2 experts [0, 1, 2, 3] already finished" in out and "stage 3 already finished" in out


def test_evaluating_tasks_the_model_was_not_trained_on_says_how_many(imported):
    asked = "cheetah-vel-8,push-v2,pick-place-v2,door-open-v2,drawer-close-v2"
    with pytest.raises(ArtifactError, match=r"moe.safetensors: the model was not trained on 4 of the 5 tasks asked for: "
                                            r"push-v2, pick-place-v2, door-open-v2 and 1 more$"):
        evaluate(str(imported), "3", "gradient", EXPERTS, tasks=asked, episodes=1, max_steps=3, workers=0, device="cpu")


def test_moe_alone_gives_the_experts_too(reference_files, small_data, tmp_path, source_model):
    files = {name: reference_files[name] for name in ("backbone", "groups", "moe")}
    main(import_argv(files, small_data, tmp_path))
    written = load_file(RunDir(tmp_path).expert("gradient", EXPERTS, 3))
    assert all(torch.equal(value, expert_tensors(source_model, 3)[key]) for key, value in written.items())
    manifest = json.loads((tmp_path / "stage2" / "experts_gradient_4" / "expert_3.manifest.json").read_text())
    assert manifest["source"]["part"] == "experts.3 of every block"


def test_backbone_alone(reference_files, small_data, tmp_path, capsys):
    main(import_argv({"backbone": reference_files["backbone"]}, small_data, tmp_path, "--expert_num", "48"))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["stage1"]
    load_policy(RunDir(tmp_path), 1, "gradient", 0)
    out = capsys.readouterr().out
    assert f"python -m m3dt.evaluate --run_dir {tmp_path} --stage 1\n" in out
    assert "(400 steps, from _iter_400 in its name; " in out


def test_a_file_name_without_its_step_count_says_what_is_recorded(reference_files, small_data, tmp_path, capsys):
    """A renamed file has no _iter_N: the manifest records the full schedule (the later stages take it as
    finished), which the import now says instead of recording 400,000 steps silently."""
    renamed = tmp_path / "prompt_model_renamed"
    renamed.write_bytes(reference_files["backbone"].read_bytes())
    main(import_argv({"backbone": renamed}, small_data, tmp_path / "run"))
    assert "(no _iter_N in its name: recorded as the full schedule, --backbone_steps 400,000 steps; " in (
        capsys.readouterr().out)
    manifest = json.loads((tmp_path / "run" / "stage1" / "backbone.manifest.json").read_text())
    assert manifest["steps_done"] == 400_000 and manifest["source"]["iterations"] is None


def test_expert_files_by_folder_pattern_or_list(tmp_path):
    for expert in range(2):
        for iteration in (100, 200):
            (tmp_path / f"expert_{expert}_iter_{iteration}").touch()
    with pytest.raises(ArtifactError, match="expert 0 has several files"):
        expert_paths(str(tmp_path), 2)
    assert [path.name for path in expert_paths(str(tmp_path / "expert_*_iter_200"), 2)] == \
        ["expert_0_iter_200", "expert_1_iter_200"]
    with pytest.raises(ArtifactError, match="more experts than --expert_num 1"):
        expert_paths(str(tmp_path / "expert_*_iter_200"), 1)


# ------------------------------------------------------------------------------------------ bad files
class RunsCode:
    """Pickles as a call that would create a file: loading must refuse it, not run it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def changed(files, tmp_path, name, change) -> dict[str, Path]:
    """The reference files with file `name` replaced by a changed copy."""
    if name == "experts":
        copy = tmp_path / "experts"
        for expert in range(EXPERTS):
            content = torch.load(files["experts"] / f"expert_{expert}_iter_200", weights_only=True)
            save_reference(copy / f"expert_{expert}_iter_200", change(content) if expert == 1 else content)
        return {**files, "experts": copy}
    content = torch.load(files[name], weights_only=True)
    result = change(content)
    path = tmp_path / files[name].name
    if isinstance(result, dict):
        save_reference(path, result)
    else:
        torch.save(result, path)
    return {**files, name: path}


def without(key):
    return lambda content: {k: v for k, v in content.items() if k != key}


def with_value(key, value):
    return lambda content: {**content, key: value}


def block_without_expert(expert):
    return lambda content: {block: {k: v for k, v in tensors.items() if not k.startswith(f"experts.{expert}.")}
                            for block, tensors in content.items()}


BAD_FILES = {  # name: (file changed, change, extra options, message)
    "missing key": ("backbone", without("transformer.h.1.mlp.c_fc.bias"), [],
                    "prompt_model_mt6_iter_400_seed0: missing key 'transformer.h.1.mlp.c_fc.bias'"),
    "Linear layout": ("backbone", lambda c: {**c, "transformer.h.0.attn.c_attn.weight": c["transformer.h.0.attn.c_attn.weight"].T},
                      [], "'transformer.h.0.attn.c_attn.weight' has shape (96, 32), expected (32, 96)"),
    "unexpected key": ("backbone", with_value("transformer.h.0.adapter_mlp.c_fc.weight", torch.zeros(32, 512)), [],
                       "unexpected key 'transformer.h.0.adapter_mlp.c_fc.weight'"),
    "NaN": ("backbone", lambda c: {**c, "embed_ln.bias": torch.full((WIDTH,), float("nan"))}, [],
            "'embed_ln.bias' contains NaN or inf"),
    "other mask": ("backbone", with_value("transformer.h.1.attn.bias", torch.ones(1, 1, 8, 8, dtype=torch.uint8)), [],
                   "'transformer.h.1.attn.bias' is not GPT-2's causal mask"),
    "not a dict": ("backbone", lambda content: list(content.values()), [], "holds a list"),
    "other width": (None, None, ["--embed_dim", "64"], "has width 32, this run has --embed_dim 64"),
    "other layer count": (None, None, ["--n_layer", "3"], "has transformer block count 2, this run has --n_layer 3"),
    "expert count": ("moe", block_without_expert(3), [], "moe__iter_300: has expert count 3, this run has --expert_num 4"),
    "expert missing key": ("experts", lambda content: {**content, "block_1": without("c_proj.bias")(content["block_1"])},
                           [], "expert_1_iter_200: missing key 'block_1.c_proj.bias'"),
    "experts differ": ("experts", lambda content: {**content, "block_0": {**content["block_0"], "c_fc.bias":
                                                                        torch.zeros(4 * WIDTH)}},
                       [], "moe__iter_300: 'block_0.experts.1.c_fc.bias' differs from 'block_0.c_fc.bias' of"),
    "router width": ("moe", lambda content: {**content, "block_0": {**content["block_0"], "router.fc3.weight":
                                                                  torch.zeros(16, 128)}},
                     [], "'block_0.router.fc3.weight' has shape (16, 128), expected (64, 128)"),
    "another file kind": (None, None, [], None),
    "a folder": (None, None, [], None),
    "other residual": (None, None, ["--residual", "standard"], "uses --residual ln2 and --top_k 0"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_files_stop_with_one_line(case, reference_files, small_data, tmp_path, capsys):
    name, change, extra, message = BAD_FILES[case]
    files = reference_files
    if case == "another file kind":  # an expert file given as the backbone
        files = {**files, "backbone": files["experts"] / "expert_0_iter_200"}
        message = "expert_0_iter_200: not the authors' stage-1 Prompt-DT state_dict: no tensor 'embed_ln.weight'"
    elif case == "a folder":  # said "does not exist"
        files = {**files, "backbone": files["experts"]}
        message = f"{files['experts']}: a folder; give the file of the authors' stage-1 Prompt-DT state_dict"
    elif name:
        files = changed(files, tmp_path, name, change)
    with pytest.raises(SystemExit) as exited:
        main(import_argv(files, small_data, tmp_path / "run", *extra))
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "run").exists()  # nothing is written before every input is checked


def test_a_file_that_would_run_code_is_refused_without_running_it(reference_files, small_data, tmp_path, capsys):
    marker = tmp_path / "code_ran"
    torch.save({"embed_ln.weight": RunsCode(marker)}, tmp_path / "prompt_model")
    with pytest.raises(SystemExit):
        main(import_argv({**reference_files, "backbone": tmp_path / "prompt_model"}, small_data, tmp_path / "run"))
    assert "prompt_model: not a torch.save file of tensors" in capsys.readouterr().err and not marker.exists()


def test_a_trained_artifact_is_not_replaced_without_restart(imported, reference_files, small_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "stage1").mkdir(parents=True)
    (run_dir / "stage1" / "backbone.safetensors").write_bytes((imported / "stage1" / "backbone.safetensors").read_bytes())
    with pytest.raises(SystemExit):
        main(import_argv(reference_files, small_data, run_dir))
    assert "backbone.safetensors: exists and was not imported from" in capsys.readouterr().err
    main(import_argv(reference_files, small_data, run_dir, "--restart"))
    main(import_argv(reference_files, small_data, run_dir))  # importing the same files again is allowed
    # a grouping of the run's own (as the grouping stage writes it) is not replaced either
    groups_manifest = run_dir / "stage2" / "groups_gradient_4.manifest.json"
    groups_manifest.write_text(json.dumps({"stage": "stage2_grouping_gradient", "inputs": {}}))
    with pytest.raises(SystemExit):
        main(import_argv(reference_files, small_data, run_dir))
    assert "groups_gradient_4.json: exists and was not imported from" in capsys.readouterr().err
