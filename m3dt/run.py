"""The run directory: where each stage writes its artifacts and the next stage finds them.

    runs/{prefix_name}_seed{seed}/
      stage1/backbone.safetensors, data_stats.safetensors, manifest.json, metrics.jsonl, train_state.pt
      stage2/groups_{method}_{G}.json + groups_{method}_{G}.manifest.json
      stage2/experts_{method}_{G}/expert_{i}.safetensors + expert_{i}.manifest.json, jobs/{name}/...
      stage3/{method}_{G}/moe.safetensors, manifest.json, metrics.jsonl, train_state.pt
      eval/...

Every file is written atomically (temporary file in the same folder, flushed, renamed), so a reader never
sees half a file and a crash leaves the previous version intact. Manifests record the resolved config, the
steps done and the sha256 of every input a stage consumed; a stage checks its inputs' manifests before use.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class ArtifactError(ValueError):
    """A missing, damaged or mismatched artifact; the message names the file."""


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    temporary_path = Path(temporary)
    try:
        yield temporary_path
        with open(temporary_path, "rb") as file:
            os.fsync(file.fileno())
        os.replace(temporary_path, path)
    finally:
        temporary_path.unlink(missing_ok=True)


def write_json(path: Path, value: Any) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(value, indent=2, sort_keys=False) + "\n")


def read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise ArtifactError(f"{path}: {what} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ArtifactError(f"{path}: {what} is not valid JSON ({error})") from None


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    contiguous = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    with atomic_path(path) as temporary:
        save_file(contiguous, str(temporary), metadata=metadata)


def load_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ArtifactError(f"{path}: {what} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ArtifactError(f"{path}: {what} is damaged or not a safetensors file ({error})") from None


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as temporary:
        torch.save(state, temporary)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A training checkpoint; `weights_only=True` so that loading never executes code from the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several unrelated types for truncated or foreign files
        raise ArtifactError(f"{path}: training checkpoint is truncated or not ours ({type(error).__name__}: {error})") from None


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Metrics logs are append-only; a torn last line is tolerated by readers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as file:
        file.write(json.dumps(record) + "\n")


class RunDir:
    """Paths of one experiment's artifacts; the only place that knows file names."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # stage 1
    @property
    def stage1(self) -> Path:
        return self.root / "stage1"

    @property
    def backbone(self) -> Path:
        return self.stage1 / "backbone.safetensors"

    @property
    def data_stats(self) -> Path:
        return self.stage1 / "data_stats.safetensors"

    # stage 2
    @property
    def stage2(self) -> Path:
        return self.root / "stage2"

    def groups(self, method: str, group_count: int) -> Path:
        return self.stage2 / f"groups_{method}_{group_count}.json"

    def experts_dir(self, method: str, group_count: int) -> Path:
        return self.stage2 / f"experts_{method}_{group_count}"

    def expert(self, method: str, group_count: int, expert_id: int) -> Path:
        return self.experts_dir(method, group_count) / f"expert_{expert_id}.safetensors"

    def expert_job(self, method: str, group_count: int, job: str) -> Path:
        return self.experts_dir(method, group_count) / "jobs" / job

    # stage 3
    def stage3(self, method: str, group_count: int) -> Path:
        return self.root / "stage3" / f"{method}_{group_count}"

    def moe(self, method: str, group_count: int) -> Path:
        return self.stage3(method, group_count) / "moe.safetensors"


def manifest_path(artifact: Path) -> Path:
    """The manifest that describes `artifact`: `manifest.json` for a stage folder, `X.manifest.json` for a file."""
    if artifact.suffix:
        return artifact.with_name(artifact.name.split(".")[0] + ".manifest.json")
    return artifact / "manifest.json"


def write_manifest(artifact: Path, stage: str, config: dict[str, Any], tasks: list[str], inputs: list[Path],
                   run_root: Path, **extra: Any) -> None:
    manifest = {
        "stage": stage,
        "artifact": str(artifact.relative_to(run_root)),
        "tasks": tasks,
        "config": config,
        "inputs": {str(path.relative_to(run_root)): file_hash(path) for path in inputs},
        **extra,
    }
    write_json(manifest_path(artifact), manifest)


def read_manifest(artifact: Path, what: str) -> dict[str, Any]:
    """The manifest of an artifact a stage is about to consume, after checking the artifact exists."""
    if not artifact.exists():
        raise ArtifactError(f"{artifact}: {what} does not exist (run the stage that writes it first)")
    return read_json(manifest_path(artifact), f"manifest of the {what}")


def check_model_fields(manifest: dict[str, Any], expected: dict[str, Any], artifact: Path) -> None:
    """Stop with a clear message when an input was made with another model configuration."""
    made_with = manifest.get("config", {})
    for name, value in expected.items():
        if made_with.get(name) != value:
            raise ArtifactError(f"{artifact}: made with {name}={made_with.get(name)!r}, this run uses {name}={value!r}")
