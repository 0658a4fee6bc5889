"""Import the authors' trained checkpoints into a run directory, written as this project's stages write it,
so that `m3dt.evaluate` and the later stages use them unchanged.

    python -m m3dt.import_reference --backbone prompt_model_mt160_iter_400000_seed0 \\
        --groups gradient_grouped_task_48_seed0.json --experts model_saved_expert/gradient_group_48_seed0 \\
        --moe moe__iter_400000 --grouping gradient --expert_num 48 --prefix_name mt160 --seed 0 \\
        --data_path ./mt160_used --run_dir runs/authors_mt160_seed0
    python -m m3dt.evaluate --run_dir runs/authors_mt160_seed0 --stage 3 --grouping gradient --expert_num 48

What the authors' code (GitHub KongYilun/M3DT) saves with torch.save, and where it goes:

- stage 1, `prompt_model_{prefix}_iter_{N}_seed{S}`: the state_dict of their PromptDecisionTransformer
  (prompt_dt/prompt_decision_transformer.py over the GPT-2 of prompt_dt/trajectory_gpt2.py)
  -> stage1/backbone.safetensors, plus stage1/data_stats.safetensors computed from --data_path as stage 1 does.
- their group file {"expert_0": [task, ...], ...} -> stage2/groups_{grouping}_{E}.json. Their stage 2 trains
  expert i on group "expert_i" and their stage 3 puts it in slot i of every block, as ours do.
- stage 2, `expert_{i}_iter_{N}`: {"block_{j}": state_dict of expert i's MLP in block j (Conv1D c_fc, c_proj)}
  -> stage2/experts_{grouping}_{E}/expert_{i}.safetensors.
- stage 3, `moe__iter_{N}`: {"block_{j}": state_dict of block j's MoE: router.fc1, fc2, fc_new, fc3, fc4
  (d -> 4d -> 4d -> 4d -> 2d -> E) and experts.{i}} -> stage3/{grouping}_{E}/moe.safetensors, over the
  stage-1 backbone (their stage 3 freezes it). Without --experts, the expert files are taken from it.

Layouts: GPT-2's Conv1D stores a weight as (in, out), the transpose of nn.Linear's (out, in); its attention
c_attn is one (d, 3d) Conv1D whose outputs are query, key, value in that order, as our qkv Linear. Their
expert MLPs are Conv1D too, in the matmul layout of our stacked experts (x @ W), so they are not transposed.
Their blocks, once experts are installed, return u + MLP(u) + experts(u) with u = LN2(h): our `--residual ln2`
(the only residual accepted here). Keys the model has no use for (the never-trained state and return heads,
GPT-2's token embedding, the attention mask buffers) are listed in the manifests, not imported.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from m3dt.config import Config, ConfigError
from m3dt.data import Prompts, files_fingerprint, read_statistics, statistics_fingerprints
from m3dt.model import build_model
from m3dt.run import (ArtifactError, RunDir, file_hash, manifest_path, read_json, save_tensors, write_json,
                      write_manifest)
from m3dt.stages import (check_groups, data_stats, optimisation_identity, recorded_config, run_cli,
                         stage_identity)
from m3dt.tasks import resolve_tasks, user_task_rows

Tensors = dict[str, torch.Tensor]

# (our module, their module, stored as a GPT-2 Conv1D), outside the transformer blocks
REFERENCE_BACKBONE = [
    ("embed.timestep", "embed_timestep", False),
    ("embed.return_to_go", "embed_return", False),
    ("embed.state", "embed_state", False),
    ("embed.action", "embed_action", False),
    ("embed_prompt.timestep", "prompt_embed_timestep", False),
    ("embed_prompt.return_to_go", "prompt_embed_return", False),
    ("embed_prompt.state", "prompt_embed_state", False),
    ("embed_prompt.action", "prompt_embed_action", False),
    ("embed_ln", "embed_ln", False),
    ("ln_final", "transformer.ln_f", False),
    ("action_head", "predict_action.0", False),
]
# the same inside block j: ours blocks.{j}.X, theirs transformer.h.{j}.Y
REFERENCE_BLOCK = [
    ("ln1", "ln_1", False),
    ("attention.qkv", "attn.c_attn", True),
    ("attention.projection", "attn.c_proj", True),
    ("ln2", "ln_2", False),
    ("mlp.up", "mlp.c_fc", True),
    ("mlp.down", "mlp.c_proj", True),
]
# one expert: our stacked-expert parameter (slot i), their Expert's key
REFERENCE_EXPERT = [("up_weight", "c_fc.weight"), ("up_bias", "c_fc.bias"), ("down_weight", "c_proj.weight"),
                    ("down_bias", "c_proj.bias")]
# a router: our Sequential's Linear layers, their Router's
REFERENCE_ROUTER = [("network.0", "fc1"), ("network.2", "fc2"), ("network.4", "fc_new"), ("network.6", "fc3"),
                    ("network.8", "fc4")]
# keys of their stage-1 state_dict that are not imported, and why
UNUSED_BACKBONE = [
    (r"predict_state\.(weight|bias)", "state head, never trained (not in the reference's loss)"),
    (r"predict_return\.(weight|bias)", "return head, never trained (not in the reference's loss)"),
    (r"transformer\.wte\.weight", "GPT-2 token embedding, unused (the model is fed embeddings)"),
    (r"transformer\.h\.\d+\.attn\.bias", "GPT-2 causal mask buffer, checked to be lower-triangular ones"),
    (r"transformer\.h\.\d+\.attn\.masked_bias", "GPT-2 score of future positions, checked to be -1e4"),
]
MASKED_SCORE = -1e4  # GPT-2's; ours is -inf: both give future positions weight exactly 0 after the softmax
GPT2_CONTEXT = 1024  # the size of GPT-2's causal mask buffer in their scripts (n_ctx left at its default)
BACKBONE_LAYOUT = "the authors' stage-1 Prompt-DT state_dict"
EXPERT_LAYOUT = "the authors' stage-2 expert file"
MOE_LAYOUT = "the authors' stage-3 MoE file"


def reference_backbone_key(key: str) -> tuple[str, bool]:
    """Their stage-1 key for one of our backbone keys, and whether it is stored as a Conv1D (transposed)."""
    table, prefix, rest = REFERENCE_BACKBONE, "", key
    if key.startswith("blocks."):
        layer, rest = key.removeprefix("blocks.").split(".", 1)
        table, prefix = REFERENCE_BLOCK, f"transformer.h.{layer}."
    for ours, theirs, conv1d in table:
        if rest.startswith(ours + "."):
            return prefix + theirs + rest[len(ours):], conv1d
    raise KeyError(f"{key} has no counterpart in the reference model")


def reference_expert_key(key: str, prefix: str = "") -> str:
    """Their key of one of our expert-file keys: blocks.{j}.up_weight -> block_{j}.{prefix}c_fc.weight."""
    layer, name = key.removeprefix("blocks.").split(".")
    return f"block_{layer}.{prefix}{dict(REFERENCE_EXPERT)[name]}"


def conv1d_layout(tensor: torch.Tensor, conv1d: bool) -> torch.Tensor:
    """A weight in the other of the two layouts when it is a Conv1D weight (its own inverse)."""
    return tensor.t() if conv1d and tensor.ndim == 2 else tensor


def reference_expert_shape(name: str, shape: torch.Size) -> tuple[int, ...]:
    """Their shape of one expert's tensor, from our per-slot shape: weights (d, 4d) as ours, biases (4d,) flat."""
    return tuple(shape[-1:]) if name.endswith("bias") else tuple(shape)


def model_shapes(config: Config, with_experts: bool) -> dict[str, torch.Size]:
    """Every tensor shape of this run's model, with `--expert_num` experts and routers when `with_experts`,
    from a model built for it (at the paper's size with 48 experts: 0.7 GB for a few seconds; the meta device
    takes longer, to import PyTorch's reference kernels)."""
    model = build_model(config, dropout=0.0)
    if with_experts:
        model.install_experts(config.expert_num, routed=True)
    return {key: value.shape for key, value in model.state_dict().items()}


def iterations(path: Path) -> int | None:
    """N of the reference's `_iter_N` file names: the training steps the file holds."""
    match = re.search(r"_iter_(\d+)", path.name)
    return int(match[1]) if match else None


# ------------------------------------------------------------------------------------------ reading their files
class ReferenceFile:
    """The tensors of one file the authors' code saved, taken key by key. Nested dicts ({"block_0": {...}})
    are flattened to dotted keys ("block_0.c_fc.weight"). Every problem stops with one line naming the file."""

    def __init__(self, path: Path, layout: str):
        self.path, self.layout = path, layout
        if path.is_dir():
            raise ArtifactError(f"{path}: a folder; give the file of {layout}")
        if not path.is_file():
            raise ArtifactError(f"{path}: {layout} does not exist")
        try:  # weights_only: loading never executes code from the file
            content = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises several unrelated types, with pages of advice, for foreign files
            raise ArtifactError(f"{path}: not a torch.save file of tensors ({type(error).__name__}); "
                                f"expected {layout}") from None
        if not isinstance(content, dict):
            raise ArtifactError(f"{path}: holds a {type(content).__name__}; expected {layout} (a dict of tensors)")
        self.values = flatten(content)
        self.sha256 = file_hash(path)
        self.taken: set[str] = set()

    def error(self, message: str) -> ArtifactError:
        """The ArtifactError (returned, not raised) "{path}: {message}" for this file."""
        return ArtifactError(f"{self.path}: {message}")

    def require(self, key: str) -> torch.Tensor:
        """The tensor at `key` whose presence tells the layout apart; its absence means another kind of file."""
        value = self.values.get(key)
        if not isinstance(value, torch.Tensor):
            example = next(iter(self.values), "none")
            raise self.error(f"not {self.layout}: no tensor '{key}' (its first key is '{example}')")
        return value

    def count(self, pattern: str) -> int:
        """How many distinct indices the group of `pattern` takes over the keys (blocks, experts)."""
        return len({match[1] for key in self.values if (match := re.match(pattern, key))})

    def take(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The float32 tensor at `key`, checked to exist, to be finite and floating-point, and to have `shape`."""
        value = self.values.get(key)
        if value is None:
            raise self.error(f"missing key '{key}' of {self.layout}")
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise self.error(f"'{key}' is a {type(value).__name__}, expected a floating-point tensor")
        if tuple(value.shape) != shape:
            raise self.error(f"'{key}' has shape {tuple(value.shape)}, expected {shape}")
        if not torch.isfinite(value).all():
            raise self.error(f"'{key}' contains NaN or inf")
        self.taken.add(key)
        return value.to(torch.float32)

    def leftover(self, unused: list[tuple[str, str]]) -> dict[str, str]:
        """The keys not taken, each with why it is not needed; any key not in `unused` is an error."""
        reasons = {}
        for key in self.values:
            if key in self.taken:
                continue
            reason = next((why for pattern, why in unused if re.fullmatch(pattern, key)), None)
            if reason is None:
                raise self.error(f"unexpected key '{key}' for {self.layout}")
            reasons[key] = reason
        return reasons


def flatten(content: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict with dotted keys ({"block_0": {"c_fc.weight": w}} -> {"block_0.c_fc.weight": w})."""
    flat: dict[str, Any] = {}
    for key, value in content.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_size(file: ReferenceFile, what: str, found: int, option: str, expected: int) -> None:
    """Raise ArtifactError naming `file` when its `what` (`found`) is not this run's `option` (`expected`)."""
    if found != expected:
        raise file.error(f"has {what} {found}, this run has {option} {expected}")


def read_backbone(path: Path, config: Config, shapes: dict[str, torch.Size]) -> tuple[Tensors, ReferenceFile, dict]:
    """Our backbone tensors from their stage-1 state_dict, with the file and its unused keys (and why)."""
    file = ReferenceFile(path, BACKBONE_LAYOUT)
    check_size(file, "width", file.require("embed_ln.weight").shape[0], "--embed_dim", config.embed_dim)
    check_size(file, "transformer block count", file.count(r"transformer\.h\.(\d+)\."), "--n_layer", config.n_layer)
    tensors = {}
    for key, shape in shapes.items():
        if ".expert_mixture." in key:
            continue
        theirs, conv1d = reference_backbone_key(key)
        stored = tuple(reversed(shape)) if conv1d and len(shape) == 2 else tuple(shape)
        tensors[key] = conv1d_layout(file.take(theirs, stored), conv1d)
    unused = file.leftover(UNUSED_BACKBONE)
    check_gpt2_buffers(file)
    return tensors, file, unused


def check_gpt2_buffers(file: ReferenceFile) -> None:
    """Their attention masks future positions through two buffers; ours hard-codes the same mask, so the
    buffers must hold GPT-2's values for the two models to compute the same function."""
    for key, value in file.values.items():
        if key.endswith(".attn.bias"):
            size = value.shape[-1] if isinstance(value, torch.Tensor) and value.ndim == 4 else 0
            causal = torch.ones(size, size, dtype=torch.bool).tril()
            if size == 0 or value.shape[:2] != (1, 1) or not torch.equal(value[0, 0].bool(), causal):
                raise file.error(f"'{key}' is not GPT-2's causal mask (lower-triangular ones)")
        elif key.endswith(".attn.masked_bias"):
            if not isinstance(value, torch.Tensor) or value.numel() != 1 or float(value) != MASKED_SCORE:
                raise file.error(f"'{key}' is not GPT-2's masked score {MASKED_SCORE}")


def take_expert(file: ReferenceFile, prefix: str, layer: int, shapes: dict[str, torch.Size]) -> Tensors:
    """One expert's tensors of block `layer`, keyed as in our expert files (blocks.{layer}.up_weight (1, d, 4d),
    ...), from their Expert state_dict under `prefix`."""
    tensors = {}
    for ours, theirs in REFERENCE_EXPERT:
        shape = shapes[f"blocks.{layer}.expert_mixture.experts.{ours}"][1:]  # one slot of the stack
        value = file.take(prefix + theirs, reference_expert_shape(ours, shape))
        tensors[f"blocks.{layer}.{ours}"] = value.reshape(1, *shape)
    return tensors


def read_expert(path: Path, config: Config, shapes: dict[str, torch.Size]) -> tuple[Tensors, ReferenceFile]:
    """Our expert-file tensors from their `expert_{i}_iter_N` ({"block_j": that block's expert MLP})."""
    file = ReferenceFile(path, EXPERT_LAYOUT)
    check_size(file, "width", file.require("block_0.c_fc.weight").shape[0], "--embed_dim", config.embed_dim)
    check_size(file, "block count", file.count(r"block_(\d+)\."), "--n_layer", config.n_layer)
    tensors = {}
    for layer in range(config.n_layer):
        tensors.update(take_expert(file, f"block_{layer}.", layer, shapes))
    file.leftover([])
    return tensors, file


def read_moe(path: Path, config: Config, shapes: dict[str, torch.Size]) -> tuple[Tensors, list[Tensors], ReferenceFile]:
    """Our router tensors (blocks.{j}.expert_mixture.router.*) and each expert's expert-file tensors from
    their `moe__iter_N` ({"block_j": that block's MoE state_dict})."""
    file = ReferenceFile(path, MOE_LAYOUT)
    check_size(file, "width", file.require("block_0.router.fc1.weight").shape[-1], "--embed_dim", config.embed_dim)
    check_size(file, "block count", file.count(r"block_(\d+)\."), "--n_layer", config.n_layer)
    check_size(file, "expert count", file.count(r"block_0\.experts\.(\d+)\."), "--expert_num", config.expert_num)
    routers: Tensors = {}
    experts: list[Tensors] = [{} for _ in range(config.expert_num)]
    for layer in range(config.n_layer):
        for ours, theirs in REFERENCE_ROUTER:
            for parameter in ("weight", "bias"):
                key = f"blocks.{layer}.expert_mixture.router.{ours}.{parameter}"
                routers[key] = file.take(f"block_{layer}.router.{theirs}.{parameter}", tuple(shapes[key]))
        for expert, tensors in enumerate(experts):
            tensors.update(take_expert(file, f"block_{layer}.experts.{expert}.", layer, shapes))
    file.leftover([])
    return routers, experts, file


def expert_paths(spec: str, count: int) -> list[Path]:
    """--experts: a folder (or a glob pattern) holding one `expert_{i}_iter_N` per expert i < count, or
    `count` comma-separated files in expert order."""
    if "," in spec:
        paths = [Path(part) for part in spec.split(",")]
        if len(paths) != count:
            raise ConfigError(f"--experts lists {len(paths)} files, --expert_num is {count}")
        return paths
    pattern = Path(spec)
    candidates = sorted(pattern.iterdir()) if pattern.is_dir() else sorted(pattern.parent.glob(pattern.name))
    found: dict[int, list[Path]] = {}
    for path in candidates:
        if match := re.fullmatch(r"expert_(\d+)_iter_\d+", path.name):
            found.setdefault(int(match[1]), []).append(path)
    for expert in range(count):
        if expert not in found:
            raise ArtifactError(f"{spec}: no file expert_{expert}_iter_N (the authors' expert {expert})")
        if len(found[expert]) > 1:
            names = ", ".join(path.name for path in found[expert])
            raise ArtifactError(f"{spec}: expert {expert} has several files ({names}); give a pattern such as "
                                f"'{pattern / 'expert_*_iter_200000' if pattern.is_dir() else spec}'")
    if max(found) >= count:
        raise ArtifactError(f"{spec}: has expert_{max(found)}_iter_N, more experts than --expert_num {count}")
    return [found[expert][0] for expert in range(count)]


def check_same_experts(moe: ReferenceFile, from_moe: list[Tensors], files: list[ReferenceFile],
                       from_files: list[Tensors]) -> None:
    """Their stage 3 freezes the experts it loads, so the MoE file must hold the expert files' tensors."""
    for expert, (file, in_moe, in_file) in enumerate(zip(files, from_moe, from_files)):
        for key, value in in_file.items():
            if not torch.equal(in_moe[key], value):
                raise moe.error(f"'{reference_expert_key(key, f'experts.{expert}.')}' differs from "
                                f"'{reference_expert_key(key)}' of {file.path} (the MoE was trained over other "
                                "experts)")


# ------------------------------------------------------------------------------------------ writing the run
def source(file: ReferenceFile, unused: dict[str, str] | None = None, part: str | None = None) -> dict[str, Any]:
    """Where an imported artifact came from, for its manifest."""
    return {"file": str(file.path), "sha256": file.sha256, "layout": file.layout, "part": part,
            "iterations": iterations(file.path), "unused_keys": unused or {}}


def steps_done(file: ReferenceFile, schedule: int) -> int:
    """The training steps the file holds, from its `_iter_N` name; without one, the stage's schedule (so that the
    later stages take it as finished: `steps_text` says which)."""
    found = iterations(file.path)
    return schedule if found is None else found


def steps_text(file: ReferenceFile, schedule: int, option: str) -> str:
    """Where an import's recorded step count comes from, for its line."""
    found = iterations(file.path)
    if found is not None:
        return f"{found:,} steps, from _iter_{found} in its name"
    return f"no _iter_N in its name: recorded as the full schedule, --{option} {schedule:,} steps"


def check_replaceable(artifact: Path, source_path: Path, sha256: str, restart: bool) -> None:
    """An artifact already in the run directory is replaced only when it was imported from the same file, or
    with --restart (an import must not silently overwrite a trained model or a grouping)."""
    if restart or not artifact.exists():
        return
    manifest = manifest_path(artifact)
    recorded = read_json(manifest, "manifest").get("source") if manifest.exists() else None
    if not recorded or recorded.get("sha256") != sha256:
        raise ArtifactError(f"{artifact}: exists and was not imported from {source_path}; use another --run_dir, "
                            "or --restart to replace it")


@dataclass
class Reference:
    """Everything read from the authors' files, checked and in our layout."""

    backbone: Tensors
    backbone_file: ReferenceFile
    unused: dict[str, str]  # keys of their stage-1 file not imported, and why
    groups: list[list[str]] | None = None
    experts: list[Tensors] = field(default_factory=list)  # per expert: our expert-file tensors
    expert_files: list[ReferenceFile] = field(default_factory=list)  # where each expert came from
    routers: Tensors | None = None
    moe_file: ReferenceFile | None = None


def read_reference(config: Config, tasks: list[str]) -> Reference:
    """Read and check every file given (backbone, groups, experts, MoE) before anything is written."""
    shapes = model_shapes(config, with_experts=bool(config.experts or config.moe))
    reference = Reference(*read_backbone(Path(config.backbone), config, shapes))
    if config.groups:
        path = Path(config.groups)
        reference.groups = check_groups(path, read_json(path, "group file"), config.expert_num, tasks)
    for path in expert_paths(config.experts, config.expert_num) if config.experts else []:
        tensors, file = read_expert(path, config, shapes)
        reference.experts.append(tensors)
        reference.expert_files.append(file)
    if config.moe:
        reference.routers, moe_experts, reference.moe_file = read_moe(Path(config.moe), config, shapes)
        check_same_experts(reference.moe_file, moe_experts, reference.expert_files, reference.experts)
        if not reference.experts:  # the MoE file holds every expert
            reference.experts, reference.expert_files = moe_experts, [reference.moe_file] * config.expert_num
    return reference


def import_reference(config: Config) -> RunDir:
    """Read and check the authors' files and the data statistics, then write the run directory: stage 1
    always, the group file and experts with --groups/--experts, stage 3 with --moe."""
    if not config.backbone:
        raise ConfigError("--backbone FILE is required: the authors' stage-1 file (prompt_model_..._iter_N_seedS)")
    if (config.experts or config.moe) and not config.groups:
        raise ConfigError("--experts and --moe need --groups: the authors' group file of those experts")
    if config.residual != "ln2" or config.top_k != 0:
        raise ConfigError("the authors' model uses --residual ln2 and --top_k 0 (a dense mixture); import with those")
    config = dataclasses.replace(config, router_hidden=None)  # the reference's widths, tied to the model width
    run = RunDir(config.resolved_run_dir())
    tasks = resolve_tasks(config.prefix_name, config.tasks, config.seed)
    reference = read_reference(config, tasks)
    targets = [(run.backbone, reference.backbone_file.path, reference.backbone_file.sha256)]
    if reference.groups is not None:
        groups_path = Path(config.groups)
        targets.append((run.groups(config.grouping, config.expert_num), groups_path, file_hash(groups_path)))
    targets += [(run.expert(config.grouping, config.expert_num, index), file.path, file.sha256)
                for index, file in enumerate(reference.expert_files)]
    if reference.moe_file:
        moe_file = reference.moe_file
        targets.append((run.moe(config.grouping, config.expert_num), moe_file.path, moe_file.sha256))
    for artifact, path, sha256 in targets:  # before the statistics pass, which reads the whole dataset
        check_replaceable(artifact, path, sha256, config.restart)
    workers = os.cpu_count() if config.workers is None else config.workers
    files = files_fingerprint(config.data_path, tasks, config.max_episodes)
    state_mean, state_std, prompts = read_statistics(config.data_path, tasks, config.max_episodes,
                                                     config.prompt_length, workers)
    data = {"files": files, "statistics": statistics_fingerprints(tasks, state_mean, state_std, prompts)}
    statistics = data_stats(torch.from_numpy(state_mean), torch.from_numpy(state_std),
                            Prompts.from_arrays(prompts, torch.device("cpu")))

    write_run(run, config, tasks, reference, statistics, data)
    stage = "3" if reference.moe_file else "1"
    print(f"evaluate it: python -m m3dt.evaluate --run_dir {run.root} --stage {stage}"
          + (f" --grouping {config.grouping} --expert_num {config.expert_num}" if stage == "3" else ""))
    return run


def write_run(run: RunDir, config: Config, tasks: list[str], reference: Reference, statistics: Tensors,
              data: dict[str, dict[str, str]]) -> None:
    """The artifacts and manifests our stages would write, each manifest with the file it came from. `data`:
    the fingerprints of the data the statistics come from, as stage 1 records them."""
    save_tensors(run.data_stats, statistics)
    save_tensors(run.backbone, reference.backbone)
    recorded = recorded_config(config, None)  # nothing was trained here
    write_manifest(run.backbone, "stage1", recorded, tasks, [], run.root,
                   steps_done=steps_done(reference.backbone_file, config.backbone_steps),
                   identity={**optimisation_identity(config, tasks), "data": data["files"]}, data=data,
                   data_stats_sha256=file_hash(run.data_stats), user_tasks=user_task_rows(tasks),
                   source=source(reference.backbone_file, reference.unused))
    steps = steps_text(reference.backbone_file, config.backbone_steps, "backbone_steps")
    print(f"imported {config.backbone} -> {run.backbone} ({steps}; {len(reference.unused)} unused keys, listed in its "
          "manifest)")
    if reference.groups is None:
        return

    groups_file = run.groups(config.grouping, config.expert_num)
    write_json(groups_file, {f"expert_{index}": group for index, group in enumerate(reference.groups)})
    write_manifest(groups_file, f"stage2_grouping_{config.grouping}", recorded, tasks, [run.backbone], run.root,
                   method=config.grouping, group_num=config.expert_num,
                   source={"file": config.groups, "sha256": file_hash(Path(config.groups)),
                           "layout": "the authors' group file"})
    print(f"imported {config.groups} -> {groups_file}")
    identity = stage_identity(config, tasks, run, [run.backbone, groups_file])
    expert_outputs = [run.expert(config.grouping, config.expert_num, index)
                      for index in range(len(reference.experts))]
    for index, (output, file) in enumerate(zip(expert_outputs, reference.expert_files)):
        save_tensors(output, reference.experts[index])
        part = f"experts.{index} of every block" if file is reference.moe_file else None
        write_manifest(output, "stage2_expert", recorded, reference.groups[index], [run.backbone, groups_file],
                       run.root, expert_id=index, steps_done=steps_done(file, config.expert_steps), identity=identity,
                       source=source(file, part=part))
    if expert_outputs:
        print(f"imported {len(expert_outputs)} experts -> {expert_outputs[0].parent} "
              f"({steps_text(reference.expert_files[0], config.expert_steps, 'expert_steps')})")
    if reference.moe_file is None:
        return

    output = run.moe(config.grouping, config.expert_num)
    inputs = [run.backbone, groups_file, *expert_outputs]
    save_tensors(output, moe_state(reference.backbone, reference.routers, reference.experts, config.n_layer))
    write_manifest(output, "stage3", recorded, tasks, inputs, run.root,
                   steps_done=steps_done(reference.moe_file, config.router_steps),
                   identity=stage_identity(config, tasks, run, inputs), num_experts=config.expert_num, top_k=0,
                   source=source(reference.moe_file))
    print(f"imported {config.moe} -> {output} ({steps_text(reference.moe_file, config.router_steps, 'router_steps')})")


def moe_state(backbone: Tensors, routers: Tensors, experts: list[Tensors], n_layer: int) -> Tensors:
    """Our stage-3 model's state_dict: backbone, routers, and the experts stacked in slot order."""
    stacked = {f"blocks.{layer}.expert_mixture.experts.{name}":
               torch.cat([tensors[f"blocks.{layer}.{name}"] for tensors in experts])
               for layer in range(n_layer) for name, _ in REFERENCE_EXPERT}
    return {**backbone, **routers, **stacked}


# ------------------------------------------------------------------------------------------ the inverse
def export_backbone(state: Tensors) -> Tensors:
    """Their stage-1 state_dict from our backbone's (the unused keys filled: heads with zeros, GPT-2's
    buffers with their values), so the authors' code can load our weights; tests use it as the inverse."""
    exported = {}
    for key, value in state.items():
        if ".expert_mixture." not in key:
            theirs, conv1d = reference_backbone_key(key)
            exported[theirs] = conv1d_layout(value, conv1d).contiguous()
    width = state["embed_ln.weight"].shape[0]
    observation_dim, action_dim = state["embed.state.weight"].shape[1], state["action_head.weight"].shape[0]
    exported.update({"predict_state.weight": torch.zeros(observation_dim, width),
                     "predict_state.bias": torch.zeros(observation_dim),
                     "predict_return.weight": torch.zeros(1, width), "predict_return.bias": torch.zeros(1),
                     "transformer.wte.weight": torch.zeros(1, width)})
    layers = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    for layer in range(layers):
        causal = torch.ones(GPT2_CONTEXT, GPT2_CONTEXT, dtype=torch.uint8).tril()
        exported[f"transformer.h.{layer}.attn.bias"] = causal[None, None]
        exported[f"transformer.h.{layer}.attn.masked_bias"] = torch.tensor(MASKED_SCORE)
    return exported


def export_expert(tensors: Tensors) -> dict[str, Tensors]:
    """{"block_j": their Expert state_dict} from one of our expert files' tensors."""
    blocks: dict[str, Tensors] = {}
    for key, value in tensors.items():
        block, theirs = reference_expert_key(key).split(".", 1)
        blocks.setdefault(block, {})[theirs] = value.reshape(reference_expert_shape(key, value.shape[1:]))
    return blocks


def export_moe(state: Tensors, n_layer: int) -> dict[str, Tensors]:
    """{"block_j": their MoE state_dict} from our stage-3 model's state_dict."""
    blocks: dict[str, Tensors] = {}
    for layer in range(n_layer):
        mixture = f"blocks.{layer}.expert_mixture."
        block = blocks[f"block_{layer}"] = {}
        for ours, theirs in REFERENCE_ROUTER:
            for parameter in ("weight", "bias"):
                block[f"router.{theirs}.{parameter}"] = state[f"{mixture}router.{ours}.{parameter}"]
        for ours, theirs in REFERENCE_EXPERT:
            stacked = state[f"{mixture}experts.{ours}"]
            for expert in range(stacked.shape[0]):
                shape = reference_expert_shape(ours, stacked.shape[1:])
                block[f"experts.{expert}.{theirs}"] = stacked[expert].reshape(shape)
    return blocks


def main(argv: list[str] | None = None) -> None:
    """`python -m m3dt.import_reference`: `import_reference` with the stages' options from `argv` (default
    sys.argv[1:]); bad input ends as one line and exit code 2 (SystemExit), a traceback with --debug."""
    run_cli(import_reference, "Import the authors' trained checkpoints (their torch.save files) into a run directory "
            "that m3dt.evaluate and the later stages use unchanged.", argv)


if __name__ == "__main__":
    main()
