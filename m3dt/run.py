"""The run directory: where each stage writes its artifacts and the next stage finds them.

    runs/{prefix_name}_seed{seed}/
      stage1/backbone.safetensors, data_stats.safetensors, manifest.json, metrics.jsonl, train_state.pt
      stage2/groups_{method}_{G}.json + groups_{method}_{G}.manifest.json
      stage2/experts_{method}_{G}/expert_{i}.safetensors + expert_{i}.manifest.json, jobs/{name}/...
      stage3/{method}_{G}/moe.safetensors, manifest.json, metrics.jsonl, train_state.pt
      baselines/{method}/model.safetensors + model.manifest.json, data_stats.safetensors, metrics.jsonl, ...
      eval/...

Every file is written atomically (temporary file in the same folder, flushed, renamed), so a reader never
sees half a file and a crash leaves the previous version intact. Manifests record the resolved config, the
steps done and the sha256 of every input a stage consumed; a stage checks its inputs' manifests before use.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import uuid
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class ArtifactError(ValueError):
    """A missing, damaged or mismatched artifact; the message names the file."""


class LockError(ArtifactError):
    """A lock file another process holds, or one that cannot be written (exclusive_locks)."""


def folder_problem(path: Path) -> str:
    """What keeps `path` from being a folder one can write in, in words ("" when nothing does): it is a file,
    or a file stands where one of the folders above it would be made."""
    if path.is_dir():
        return ""
    if path.exists():
        return "is a file, not a folder"
    existing = next((parent for parent in path.parents if parent.exists()), None)
    if existing is not None and not existing.is_dir():
        return f"cannot be made: {existing} is a file, not a folder"
    return ""


def check_folder(path: Path, what: str, error_type: type[Exception] = ArtifactError) -> None:
    """Stop at once, in one line naming `path` and `what` it should be, when `path` is a file or cannot be made
    a folder (a file above it): found late, the same mkdir fails after the work whose output it is to hold."""
    problem = folder_problem(path)
    if problem:
        raise error_type(f"{path}: {what} {problem}")


def make_folder(path: Path, what: str, error_type: type[Exception] = ArtifactError) -> Path:
    """Make the folder `path` (and those above it) unless it exists, and return it; `error_type` (ArtifactError
    unless a caller's own) in one line naming `path` and `what` it should be when it is a file, cannot be made
    or is not writable. Output folders of the commands are made with it before their work starts."""
    check_folder(path, what, error_type)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # permission denied, read-only file system, a file made meanwhile, ...
        raise error_type(f"{path}: {what} cannot be made ({error.strerror or type(error).__name__})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise error_type(f"{path}: {what} is not writable")
    return path


def check_file_target(path: Path, what: str, error_type: type[Exception] = ArtifactError) -> None:
    """Stop at once, in one line naming `path`, when a file cannot be written there: it is a folder, or a file
    stands where a folder above it would be made (found when it is written, the work before would be lost)."""
    if path.is_dir():
        raise error_type(f"{path}: {what} is a folder; give a file name")
    check_folder(path.parent, f"folder of the {what}", error_type)


@contextmanager
def exclusive_locks(paths: list[Path], holder: str) -> Iterator[None]:
    """Hold an exclusive lock (flock) on each lock file of `paths` while the body runs, so that two processes
    never work on the same files at once (one would truncate the other's log, both would write the same
    artifacts). A lock another process holds is LockError at once, naming it and `holder`, what it guards;
    the kernel releases the locks when the body ends or the process dies, however it dies. LockError also for a
    lock file that cannot be written."""
    with ExitStack() as stack:
        for path in paths:
            make_folder(path.parent, f"folder of the lock of {holder}", LockError)
            try:
                file = stack.enter_context(open(path, "a"))
            except OSError as error:
                raise LockError(f"{path}: cannot write the lock of {holder} ({error.strerror or error})") from None
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LockError(f"{path}: {holder} is being run by another process, which holds this lock; "
                                    "wait for it or stop it") from None
        yield


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` for the caller to create; on success fsync it, give it the
    permissions the user's umask gives new files, and rename it over `path`. Writers differ in the mode
    they create files with (safetensors 0.8 writes 0600, owner only), so the mode is set here, for every
    artifact alike."""
    check_file_target(path, "file")  # the callers check theirs at start; this names a folder made since
    make_folder(path.parent, "folder")
    temporary_path = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield temporary_path
        with open(temporary_path, "rb") as file:
            os.fsync(file.fileno())
        os.chmod(temporary_path, 0o666 & ~current_umask())
        os.replace(temporary_path, path)
    finally:
        temporary_path.unlink(missing_ok=True)


def current_umask() -> int:
    """The process's umask (reading it means setting it: set it back at once)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def remove_stale_temporaries(path: Path) -> None:
    """Delete the temporary files of `path` left by a writer that was killed mid-write (SIGKILL skips the
    cleanup above); call it only where one process owns `path`."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def write_json(path: Path, value: Any) -> None:
    """Write `value` as JSON (indent 2, keys in their order, a final newline) to `path`, atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(value, indent=2, sort_keys=False) + "\n")


def read_json(path: Path, what: str, error_type: type[Exception] = ArtifactError) -> Any:
    """The JSON value in `path`; `error_type` (ArtifactError for a stage's artifact, TaskError for a user's task
    file, ...) naming the file and `what` it should be when it is missing, not UTF-8 text or not JSON."""
    if path.is_dir():
        raise error_type(f"{path}: is a folder; the {what} is a JSON file")
    if not path.is_file():
        raise error_type(f"{path}: {what} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise error_type(f"{path}: {what} is not valid JSON: not UTF-8 text (byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise error_type(f"{path}: {what} is not valid JSON ({error})") from None


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (detached, contiguous CPU copies) and the string `metadata` as a safetensors file,
    atomically."""
    contiguous = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    with atomic_path(path) as temporary:
        save_file(contiguous, str(temporary), metadata=metadata)


def load_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, by name, on the CPU; ArtifactError naming the file and `what` it
    should be when it is missing, damaged or not a safetensors file."""
    if not path.is_file():
        raise ArtifactError(f"{path}: {what} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ArtifactError(f"{path}: {what} is damaged or not a safetensors file ({error})") from None


def safetensors_damage(path: Path) -> str:
    """What is wrong with a safetensors file's structure, read from its header without loading it ("" when its
    size is what the header says, or for a file of another kind): a file cut short by a copy or a full disk, or
    not a safetensors file."""
    if path.suffix != ".safetensors":
        return ""
    size = path.stat().st_size
    with open(path, "rb") as file:
        start = file.read(8)
        if len(start) < 8:
            return f"{size} bytes, shorter than a safetensors header"
        header_size = int.from_bytes(start, "little")
        if header_size > size - 8:
            return f"{size} bytes, fewer than its header's {header_size}"
        try:
            header = json.loads(file.read(header_size))
            data = max([entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"],
                       default=0)
        except (ValueError, TypeError, KeyError, IndexError):
            return "its header is not a safetensors header"
    expected = 8 + header_size + data
    return "" if size == expected else f"{size} bytes where its header says {expected}"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a training checkpoint (torch.save) atomically: a killed write leaves the previous one."""
    with atomic_path(path) as temporary:
        torch.save(state, temporary)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A training checkpoint; `weights_only=True` so that loading never executes code from the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several unrelated types, with pages of advice, for foreign files
        raise ArtifactError(f"{path}: training checkpoint is truncated or not ours ({type(error).__name__})") from None
    if not isinstance(state, dict):
        raise ArtifactError(f"{path}: not a training checkpoint (holds a {type(state).__name__})")
    return state


def file_hash(path: Path) -> str:
    """sha256 of the file's bytes as 64 hex digits, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Metrics logs are append-only; a torn last line is tolerated by readers."""
    make_folder(path.parent, "folder")
    with open(path, "a") as file:
        file.write(json.dumps(record) + "\n")


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the records up to `last_step`, dropping a line torn by a kill: a resumed run logs the later steps
    again, and a fresh start (last_step 0) begins a new log."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record["step"] <= last_step:
            kept.append(line + "\n")
    with atomic_path(path) as temporary:
        temporary.write_text("".join(kept))


class RunDir:
    """Paths of one experiment's artifacts; the only place that knows file names."""

    def __init__(self, root: str | Path):
        """`root` may not exist yet (a stage makes it); a file there, or above it, is refused at once
        (ArtifactError), before any stage works for hours towards a folder that cannot be made."""
        self.root = Path(root)
        check_folder(self.root, "run directory")

    def make(self, folder: Path) -> Path:
        """Make `folder`, one of this run's (e.g. `self.stage1`), before a stage starts the work it will hold;
        ArtifactError naming it when it is a file or cannot be made."""
        return make_folder(folder, "folder of the run directory")

    # stage 1
    @property
    def stage1(self) -> Path:
        """Stage 1's folder: the backbone, data statistics, manifest, metrics and training checkpoint."""
        return self.root / "stage1"

    @property
    def backbone(self) -> Path:
        """The stage-1 backbone's weights (stage1/backbone.safetensors)."""
        return self.stage1 / "backbone.safetensors"

    @property
    def data_stats(self) -> Path:
        """Stage 1's per-task state mean and std and evaluation prompt, which the evaluator reads with the model."""
        return self.stage1 / "data_stats.safetensors"

    # stage 2
    @property
    def stage2(self) -> Path:
        """Stage 2's folder: the task groupings and the experts trained on them."""
        return self.root / "stage2"

    def groups(self, method: str, group_count: int) -> Path:
        """The task groups of grouping `method` (gradient, random) into `group_count` groups."""
        return self.stage2 / f"groups_{method}_{group_count}.json"

    def experts_dir(self, method: str, group_count: int) -> Path:
        """The folder of the experts trained on those groups (one per task group)."""
        return self.stage2 / f"experts_{method}_{group_count}"

    def expert(self, method: str, group_count: int, expert_id: int) -> Path:
        """The weights of expert `expert_id` (that of task group `expert_id`)."""
        return self.experts_dir(method, group_count) / f"expert_{expert_id}.safetensors"

    def expert_job(self, method: str, group_count: int, job: str) -> Path:
        """The folder of one stage-2 training job (`all`, `shard_g_of_N`, `expert_i`): metrics, checkpoint."""
        return self.experts_dir(method, group_count) / "jobs" / job

    # stage 3
    def stage3(self, method: str, group_count: int) -> Path:
        """Stage 3's folder for the experts of (`method`, `group_count`): the MoE model, manifest, metrics and
        training checkpoint."""
        return self.root / "stage3" / f"{method}_{group_count}"

    def moe(self, method: str, group_count: int) -> Path:
        """The stage-3 model: its whole state dict (backbone, experts and routers)."""
        return self.stage3(method, group_count) / "moe.safetensors"

    # comparison methods and ablations (m3dt/baselines)
    def baseline(self, method: str) -> Path:
        """The folder of a comparison method or ablation (an m3dt.baselines --method)."""
        return self.root / "baselines" / method

    def baseline_model(self, method: str) -> Path:
        """That method's trained model (model.safetensors, its manifest beside it)."""
        return self.baseline(method) / "model.safetensors"

    def baseline_data_stats(self, method: str) -> Path:
        """That method's data statistics (as stage 1's), which the evaluator reads with its model."""
        return self.baseline(method) / "data_stats.safetensors"


def manifest_path(artifact: Path) -> Path:
    """The manifest that describes `artifact`: `manifest.json` for a stage folder, `X.manifest.json` for a file."""
    if artifact.suffix:
        return artifact.with_name(artifact.name.split(".")[0] + ".manifest.json")
    return artifact / "manifest.json"


def write_manifest(artifact: Path, stage: str, config: dict[str, Any], tasks: list[str], inputs: list[Path],
                   run_root: Path, **extra: Any) -> None:
    """Write the manifest beside `artifact`: the stage, its tasks and settings, and the sha256 of every input
    file, so that a later stage can tell whether what it reads is what this stage was made from."""
    manifest = {
        "stage": stage,
        "artifact": str(artifact.relative_to(run_root)),
        "tasks": tasks,
        "config": config,
        "inputs": input_hashes(inputs, run_root),
        **extra,
    }
    write_json(manifest_path(artifact), manifest)


def input_hashes(inputs: list[Path], run_root: Path) -> dict[str, str]:
    """sha256 of each input, keyed by its path in the run directory (so a moved run directory still matches)."""
    return {str(path.relative_to(run_root)): file_hash(path) for path in inputs}


def read_manifest(artifact: Path, what: str) -> dict[str, Any]:
    """The manifest of an artifact a stage is about to consume, after checking the artifact exists."""
    if not artifact.exists():
        raise ArtifactError(f"{artifact}: {what} does not exist (run the stage that writes it first)")
    damage = safetensors_damage(artifact)
    if damage:
        raise ArtifactError(f"{artifact}: {what} is damaged ({damage}); run the stage that writes it again (its "
                            "checkpoint rewrites it)")
    return read_json(manifest_path(artifact), f"manifest of the {what}")


def check_model_fields(manifest: dict[str, Any], expected: dict[str, Any], artifact: Path) -> None:
    """Stop with a clear message when an input was made with another model configuration, naming the flag that
    would make this run agree with it (each stage takes the model options from its command line)."""
    made_with = manifest.get("config", {})
    for name, value in expected.items():
        if made_with.get(name) != value:
            hint = f"; pass --{name} {made_with[name]} to use it" if made_with.get(name) is not None else ""
            raise ArtifactError(f"{artifact}: made with {name}={made_with.get(name)!r}, this run uses "
                                f"{name}={value!r}{hint}")


def check_inputs(manifest: dict[str, Any], expected: dict[str, str], artifact: Path) -> None:
    """Stop when an input was made from other files than this run's (e.g. a backbone retrained since)."""
    recorded = manifest.get("inputs", {})
    for name, digest in expected.items():
        if recorded.get(name) != digest:
            raise ArtifactError(f"{artifact}: made from another {name} than the one in this run; "
                                "retrain it (--restart)")
