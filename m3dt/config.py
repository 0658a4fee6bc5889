"""Every option of the pipeline in one typed dataclass.

Flag names follow the reference scripts (`--prefix_name`, `--embed_dim`, `--data_path`, `--group_num`,
`--expert_num`, ...). Values are merged in this order, later wins: dataclass defaults, then the YAML file
given by `--config`, then flags on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import yaml

from m3dt.moe import tied_router_hidden


class ConfigError(ValueError):
    """A config file or option that cannot be used."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors (an unknown option, a value that does not parse or is not a choice) as one
    line and exit code 2, like every other bad input, instead of the usage block followed by the error; no
    abbreviated options (argparse would take --episode for --episodes, and a misspelt option would pass)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """Print "error: {message} (--help lists the options)" to stderr and exit with code 2 (SystemExit)."""
        self.exit(2, f"error: {message} (--help lists the options)\n")


@dataclass
class Config:
    """Every option of the pipeline; each field's trailing comment is its --help text (`field_comments`)."""

    # what to train on
    prefix_name: str | None = None  # official suite: mt10, mt20, mt40, mt80, mt120, mt160
    tasks: str | None = None  # instead of a suite: "a,b,c" or "@file.json"
    data_path: str = "./mt160_used"  # {data_path}/{task}/: npz episodes or a Minari dataset; minari:NS: datasets NS/{task}
    task_table: str | None = None  # JSON file of your own tasks (README "Your own tasks"), usable beside MT160's
    max_episodes: int = 2000  # episodes read per task (the official data is capped at 2000)
    seed: int = 0  # initial weights, batches, dropout, the groupings; picks the official suite lists of seeds 0-2
    run_dir: str | None = None  # default: runs/{prefix_name or 'custom'}_seed{seed}

    # model (paper table 5)
    embed_dim: int = 256  # token width
    n_layer: int = 6  # transformer blocks
    n_head: int = 8  # attention heads (embed_dim must be a multiple of it)
    dropout: float = 0.1  # on embeddings, attention, residual branches and experts
    context_length: int = 20  # K: steps of the trajectory segment
    prompt_length: int = 5  # steps of the prompt window
    max_timestep: int = 1000  # size of the timestep embedding table
    residual: str = "ln2"  # "ln2": the reference's u + MLP(u) once experts are installed; "standard": h + MLP(u)
    top_k: int = 0  # 0: dense soft mixture over all experts (the paper); k > 0: the k most probable experts, weighted by their softmax probabilities
    router_hidden: str | None = None  # hidden widths of each block's router MLP, "a,b,..."; default: the reference's 4d,4d,4d,2d for d = embed_dim

    # optimisation (all stages)
    batch_size: int = 16  # segments per task per step (per rank under torchrun)
    learning_rate: float = 1e-4  # AdamW, after the linear warmup
    weight_decay: float = 1e-4  # AdamW, on every trainable parameter
    warmup_steps: int = 10_000  # linear learning-rate warmup from 1/warmup_steps
    grad_clip: float = 0.25  # gradient norm clip (per expert in expert training)

    # schedules: steps of each stage (MT160 paper schedule); --max_iters overrides the stage being run
    backbone_steps: int = 400_000  # stage 1
    expert_steps: int = 200_000  # stage 2, per expert
    router_steps: int = 400_000  # stage 3
    max_iters: int | None = None  # steps of the stage being run, instead of its schedule above

    # stage 1: gradient conflict between tasks (metrics.jsonl and stage1/gradient_conflict.png)
    conflict_every: int = 0  # stage 1: measure the gradient conflict between tasks every N steps; 0: off
    conflict_tasks: int = 8  # tasks (spread over the task list) whose gradients the conflict measure compares
    conflict_batches: int = 4  # batch gradients averaged per task for the conflict measure

    # stage 2
    grouping: str = "gradient"  # which grouping the expert and router stages use: gradient | random
    group_num: int = 48  # groups written by the grouping stage
    expert_num: int = 48  # experts used by expert training and the router (= the grouping's group count)
    expert_id: int | None = None  # train this expert only
    all: bool = False  # train every expert of the grouping in one process
    shard: str | None = None  # with --all, "i/n": only experts i, i+n, i+2n, ... (one of n GPUs' share)
    grouping_gradients: int = 10  # gradients averaged per task for the gradient features
    kmeans_restarts: int = 40  # K-means runs per repetition; the lowest sum of distances wins
    kmeans_repeats: int = 40  # repetitions; the partition with the most even group sizes wins
    kmeans_iterations: int = 100  # Lloyd iterations per K-means run at most
    kmeans_stop: str = "reference"  # K-means stop: reference (every centroid coordinate moved < tolerance; the centroids from before that update), relative (summed squared shift <= tolerance x the features' total variance), summed (summed squared shift <= tolerance)
    kmeans_tolerance: float = 1e-4  # the tolerance of --kmeans_stop

    # comparison methods (python -m m3dt.baselines --method ...); README "Comparison methods"
    harmodt_steps: int = 1_000_000  # HarmoDT's training steps (its code's max_iters)
    harmodt_sparsity: float = 0.2  # HarmoDT: share of each task's mask that is 0, spread over layers by ERK
    harmodt_mask_interval: int = 500  # HarmoDT: steps between updates of the task masks
    harmodt_eta_min: int = 0  # HarmoDT: mask entries changed per task per update at the start and end
    harmodt_eta_max: int = 100  # HarmoDT: mask entries changed per task per update halfway (cosine in between)
    harmodt_gamma: float = 10.0  # HarmoDT: weight of the agreement with the mean gradient in the pruning score
    harmodt_select: str = "fisher"  # HarmoDT: importance in the pruning score: fisher (gradient^2) or magnitude

    # importing the authors' trained checkpoints (python -m m3dt.import_reference)
    backbone: str | None = None  # their stage-1 file (prompt_model_{prefix}_iter_N_seedS)
    experts: str | None = None  # their expert files: a folder of expert_{i}_iter_N, or file,file,... in expert order
    groups: str | None = None  # their group file, JSON {"expert_0": [task, ...], ...}; needed by --experts/--moe
    moe: str | None = None  # their stage-3 file (moe__iter_N): routers and experts of every block

    # the demo (m3dt.demo) collects its own data and evaluates with these
    demo_episodes: int = 30  # episodes collected per task; the last two are the prompts
    demo_noise: float = 0.1  # std of the Gaussian noise on the scripted actions
    eval_episodes: int | None = None  # episodes per task; None: the protocol's per family
    eval_max_steps: int | None = None  # None: each task's full horizon
    context_actions: str = "full"  # evaluation context: full 8-d predicted actions (the reference) | masked: dims >= act_dim zeroed
    demo_collect_seed: int = 100  # the demo's collection seed: its MT1 goals; evaluation uses those of --seed
    workers: int | None = None  # processes that read the data and step envs; None: the CPU count

    # running
    device: str = "auto"  # auto: cuda when available, else cpu
    data_device: str = "auto"  # where the dataset lives: auto (the training device when the planned peak fits its free memory with a margin, else host memory), cuda, cpu
    precision: str = "fp32"  # fp32 | tf32 (float32 with TF32 tensor-core matmuls on GPUs) | bf16 (autocast)
    deterministic: bool = False  # PyTorch's deterministic kernels (on CUDA: bit-reproducible training)
    compile: str = "none"  # torch.compile mode of the training forward; reduce-overhead: CUDA graphs on a GPU
    log_every: int = 100  # steps between lines of metrics.jsonl (and the only host syncs)
    save_every: int = 5000  # steps between checkpoints (train_state.pt)
    restart: bool = False  # ignore an existing checkpoint and start the stage over
    wandb: bool = False  # log to Weights & Biases too (offline unless WANDB_MODE says otherwise)
    wandb_project: str = "m3dt"  # the Weights & Biases project
    debug: bool = False  # show tracebacks instead of one-line errors
    config: str | None = None  # YAML file of these options

    def resolved_run_dir(self) -> Path:
        """The run directory: --run_dir, else runs/{prefix_name or 'custom'}_seed{seed} (relative to the cwd)."""
        if self.run_dir:
            return Path(self.run_dir)
        return Path("runs") / f"{self.prefix_name or 'custom'}_seed{self.seed}"

    def stage_steps(self, default: int) -> int:
        """Steps of the stage being run: --max_iters when given, else `default` (the stage's schedule)."""
        return self.max_iters if self.max_iters is not None else default

    def model_fields(self) -> dict[str, Any]:
        """The options that fix the shape and function of the model: a later stage must agree on them.
        The router widths are resolved, so a tied default and the same widths given explicitly agree."""
        names = ("embed_dim", "n_layer", "n_head", "context_length", "prompt_length", "max_timestep", "residual")
        return {**{name: getattr(self, name) for name in names}, "router_hidden": self.router_widths()}

    def backbone_fields(self) -> dict[str, Any]:
        """model_fields without the router widths: what a stage-1 backbone and a stage-2 expert must agree on with
        a later stage. Neither has routers (stage 3 builds them, as the reference does), so stage 3 may try
        other router widths over them."""
        return {name: value for name, value in self.model_fields().items() if name != "router_hidden"}

    def router_widths(self) -> str:
        """--router_hidden without spaces, or the widths tied to --embed_dim."""
        widths = (self.router_hidden.split(",") if self.router_hidden else tied_router_hidden(self.embed_dim))
        return ",".join(str(int(width)) for width in widths)


CHOICES = {
    "residual": ("ln2", "standard"),
    "grouping": ("gradient", "random"),
    "kmeans_stop": ("reference", "relative", "summed"),
    "precision": ("fp32", "tf32", "bf16"),
    "data_device": ("auto", "cuda", "cpu"),
    "compile": ("none", "default", "reduce-overhead", "max-autotune"),
    "harmodt_select": ("fisher", "magnitude"),
    "context_actions": ("full", "masked"),
}
# Sizes, counts and intervals below 1 would fail deep inside a stage (a division by zero, an empty tensor) or
# do nothing and say it was done (0 steps writes an untrained model); optional ones may be None (their default).
POSITIVE = ("embed_dim", "n_layer", "n_head", "context_length", "prompt_length", "max_timestep", "batch_size",
            "warmup_steps", "log_every", "save_every", "group_num", "expert_num", "conflict_tasks", "conflict_batches",
            "harmodt_mask_interval", "max_episodes", "backbone_steps", "expert_steps", "router_steps", "harmodt_steps",
            "grouping_gradients", "kmeans_restarts", "kmeans_repeats", "kmeans_iterations", "demo_episodes",
            "max_iters")  # eval_episodes, eval_max_steps: m3dt.evaluate checks them under its flags
NON_NEGATIVE = ("seed", "top_k", "expert_id", "workers", "conflict_every", "demo_collect_seed")
# The float options' ranges: probabilities and shares in [0, 1), step sizes above 0, weights and noise at least 0.
UNIT_INTERVAL = ("dropout", "harmodt_sparsity")
POSITIVE_FLOATS = ("learning_rate", "grad_clip")
NON_NEGATIVE_FLOATS = ("weight_decay", "kmeans_tolerance", "harmodt_gamma", "demo_noise")


def _option_type(field_type: str):
    if "bool" in field_type:
        return None
    if "int" in field_type:
        return int
    if "float" in field_type:
        return float
    return str


def field_comments() -> dict[str, str]:
    """Each option's trailing comment in the Config source: the one place an option is documented, shown
    again by --help."""
    return dict(re.findall(r"^\s+(\w+): [^#\n]*#\s*(.+)$", inspect.getsource(Config), flags=re.MULTILINE))


def build_parser(description: str) -> ArgumentParser:
    """A parser with one flag per Config field; unspecified flags stay absent so that YAML values survive."""
    parser = ArgumentParser(description=description, argument_default=argparse.SUPPRESS)
    comments = field_comments()
    for config_field in dataclasses.fields(Config):
        flag = f"--{config_field.name}"
        comment = comments.get(config_field.name, "")
        help_text = f"{comment} (default: {config_field.default})".strip().replace("%", "%%")
        option_type = _option_type(str(config_field.type))
        if option_type is None:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(flag, type=option_type, choices=CHOICES.get(config_field.name), help=help_text)
    return parser


def read_yaml_mapping(file: Path, what: str) -> dict[str, Any]:
    """A YAML file that holds a mapping; a missing file, a file that is not UTF-8 text, bad YAML or another
    type is one ConfigError."""
    if not file.is_file():
        raise ConfigError(f"{what} {file} does not exist")
    try:
        values = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as error:
        raise ConfigError(f"{what} {file} is not valid YAML: not UTF-8 text (byte {error.start})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{what} {file} is not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{what} {file} must be a mapping of option: value")
    return values


def load_yaml(path: str) -> dict[str, Any]:
    """The options of a config file (`--config`), each converted to its Config field's type. Raises
    ConfigError naming the file for unknown options and values of the wrong type."""
    file = Path(path)
    values = read_yaml_mapping(file, "config file")
    unknown = sorted(set(values) - set(field_types()))
    if unknown:
        raise ConfigError(f"config file {file}: unknown option(s) {', '.join(unknown)}")
    try:
        return {name: option_value(name, value) for name, value in values.items()}
    except ConfigError as error:
        raise ConfigError(f"config file {file}: {error}") from None


def field_types() -> dict[str, str]:
    """Each option's type as written in Config ("int", "str | None", ...)."""
    return {config_field.name: str(config_field.type) for config_field in dataclasses.fields(Config)}


def option_value(name: str, value: Any) -> Any:
    """A YAML value of option `name` converted to its type as the flag's text would be, so that `1e-4` (a
    string to YAML 1.1) is a float; a value that does not convert is a ConfigError "{name} must be {type},
    got {value}" here (the caller names the file) rather than an error deep inside a stage."""
    field_type = field_types()[name]
    if value is None and "None" in field_type:
        return None
    option_type = _option_type(field_type)
    if option_type is None and isinstance(value, bool):
        return value
    if option_type is not None and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return option_type(str(value))
        except ValueError:
            pass
    raise ConfigError(f"{name} must be {field_type}, got {value!r}")


def parse_config(description: str, argv: list[str] | None = None) -> Config:
    """Dataclass defaults, then the YAML file, then the flags. ConfigError for a value out of range names the
    config file when the value came from it."""
    flags = vars(build_parser(description).parse_args(argv))
    from_file = load_yaml(flags["config"]) if flags.get("config") else {}
    config = Config(**{**from_file, **flags})
    try:
        check_values(config)
    except ConfigError as error:
        if any(str(error).startswith(f"--{name} ") for name in from_file if name not in flags):
            raise ConfigError(f"config file {flags['config']}: {error}") from None
        raise
    return config


def check_values(config: Config) -> None:
    """Raise ConfigError, naming the option, for a choice outside its allowed values, a count below its
    minimum, a float outside its range (dropout 1 would make every activation 0 and its gradient NaN) or
    options that contradict each other."""
    for name, allowed in CHOICES.items():
        if getattr(config, name) not in allowed:
            raise ConfigError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(config, name)!r}")
    for names, minimum in ((POSITIVE, 1), (NON_NEGATIVE, 0)):
        for name in names:
            value = getattr(config, name)
            if value is not None and value < minimum:
                raise ConfigError(f"--{name} must be at least {minimum}, got {value}")
    for name in UNIT_INTERVAL:  # `not` so that NaN fails too
        if not 0.0 <= getattr(config, name) < 1.0:
            raise ConfigError(f"--{name} must be in [0, 1), got {getattr(config, name)}")
    for name in POSITIVE_FLOATS:
        if not getattr(config, name) > 0.0:
            raise ConfigError(f"--{name} must be above 0, got {getattr(config, name)}")
    for name in NON_NEGATIVE_FLOATS:
        if not getattr(config, name) >= 0.0:
            raise ConfigError(f"--{name} must be at least 0, got {getattr(config, name)}")
    if not 0 <= config.harmodt_eta_min <= config.harmodt_eta_max:
        raise ConfigError(f"--harmodt_eta_min/--harmodt_eta_max must satisfy 0 <= min <= max, got "
                          f"{config.harmodt_eta_min}, {config.harmodt_eta_max}")
    if config.embed_dim % config.n_head:
        raise ConfigError(f"--embed_dim {config.embed_dim} must be a multiple of --n_head {config.n_head}")
    if config.shard is not None:
        index, _, count = config.shard.partition("/")
        if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
            raise ConfigError(f"--shard must be i/n with 0 <= i < n, got {config.shard!r}")
        if not config.all:
            raise ConfigError("--shard goes with --all")
    if config.router_hidden is not None and not all(
            width.strip().isdigit() and int(width) > 0 for width in config.router_hidden.split(",")):
        raise ConfigError(f"--router_hidden must be comma-separated positive widths, got {config.router_hidden!r}")
