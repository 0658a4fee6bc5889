"""Every command-line entry point, given each class of bad input, stops with exit code 2 and exactly one
line on stderr ("error: ..."), never a traceback. The Python entry points run in this process (the stage
scripts through runpy, as `python script.py` runs them); the shell script needs a subprocess."""

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from m3dt import bench, collect, demo, evaluate, experiment, import_reference, memory, report
from tests.conftest import REPO

STAGE_SCRIPTS = ("stage1_backbone_train.py", "stage2_task_grouping_gradient.py", "stage2_task_grouping_random.py",
                 "stage2_expert_train.py", "stage3_router_train.py")
MODULES = {"m3dt.evaluate": evaluate.main, "m3dt.report": report.main, "m3dt.collect": collect.main,
           "m3dt.demo": demo.main, "m3dt.bench": bench.main, "m3dt.import_reference": import_reference.main,
           "m3dt.experiment": experiment.main, "m3dt.memory": memory.main}
SHELL_SCRIPT = "stage2_expert_train_total.sh"


def bad_inputs(entry: str, tmp: Path) -> dict[str, tuple[list[str], str]]:
    """The bad inputs an entry point takes: class -> (argv, a part of the expected message)."""
    missing_yaml, broken_yaml = tmp / "missing.yaml", tmp / "broken.yaml"  # the test writes broken.yaml
    binary_yaml = tmp / "binary.yaml"  # and binary.yaml, not UTF-8 text, and tasks.json, not a list
    nowhere = tmp / "nowhere"
    a_file = broken_yaml  # any file: where a folder is asked for, the message says it is a file
    config_file = {"missing config file": (["--config", str(missing_yaml)], f"config file {missing_yaml} does not exist"),
                   "bad config file": (["--config", str(broken_yaml)], f"config file {broken_yaml} is not valid YAML"),
                   "binary config file": (["--config", str(binary_yaml)],
                                          f"config file {binary_yaml} is not valid YAML: not UTF-8 text (byte 0)")}
    unknown_option = {"unknown option": (["--no_such_option"], "unrecognized arguments: --no_such_option")}
    stage = {**config_file, **unknown_option,
             "bad option value": (["--grouping", "kmeans"], "argument --grouping: invalid choice: 'kmeans'"),
             "out-of-range number": (["--save_every", "0"], "--save_every must be at least 1, got 0")}
    tasks = ["--tasks", "reach-v2"]
    if entry == "stage1_backbone_train.py":
        return {**stage, "missing data": ([*tasks, "--data_path", str(nowhere), "--run_dir", str(tmp)],
                                          f"{nowhere}: data root does not exist")}
    if entry == "m3dt.import_reference":
        return {**stage, "missing checkpoint file": ([*tasks, "--backbone", f"{nowhere}.pt", "--run_dir", str(tmp)],
                                                     f"{nowhere}.pt: the authors' stage-1 Prompt-DT state_dict does not exist")}
    run_dir_a_file = {"run dir is a file": ([*tasks, "--run_dir", str(a_file)],
                                            f"{a_file}: run directory is a file, not a folder")}
    if entry in STAGE_SCRIPTS:
        return {**stage, **run_dir_a_file,
                "missing run dir": ([*tasks, "--run_dir", str(nowhere)], f"{nowhere}/stage1/backbone")}
    if entry == SHELL_SCRIPT:
        return {**stage, "missing run dir": ([*tasks, "--run_dir", str(nowhere)], f"{nowhere}/stage1/backbone")}
    if entry == "m3dt.evaluate":
        run = ["--stage", "1", "--run_dir", str(nowhere)]
        return {**{case: (["--stage", "1", *argv], message) for case, (argv, message) in config_file.items()},
                "unknown option": (["--stage", "1", "--no_such_option"], "unrecognized arguments: --no_such_option"),
                "bad option value": ([*run, "--context_actions", "some"], "argument --context_actions: invalid choice"),
                "missing run dir": (run, f"{nowhere}: run directory does not exist"),
                "run dir is a file": (["--stage", "1", "--run_dir", str(a_file)],
                                      f"{a_file}: run directory is a file, not a folder"),
                # Meta-World's MT1 has 50 goals per task and seed
                "out-of-range number": ([*run, "--tasks", "basketball-v2", "--episodes", "51"],
                                        "--episodes 51: Meta-World evaluation has 50 goals per task"),
                "negative workers": ([*run, "--workers", "-1"], "--workers must be at least 0, got -1"),
                "zero steps": ([*run, "--max_steps", "0"], "--max_steps must be at least 1, got 0"),
                "zero wave": ([*run, "--max_rollouts", "0"], "--max_rollouts must be at least 1, got 0"),
                "negative seed": ([*run, "--seed", "-1"], "--seed must be at least 0, got -1"),
                "unknown task": ([*run, "--tasks", "reach-v9"], "unknown task 'reach-v9'")}
    if entry == "m3dt.report":
        return {**config_file, **unknown_option, "missing run dir": ([str(nowhere)], f"{nowhere}: no eval/*/results.json"),
                "run dir is a file": ([str(a_file)], f"{a_file}: is a file, not a folder (give run roots"),
                "out is a file": ([str(tmp), "--out", str(a_file)],
                                  f"{a_file}: report folder (--out) is a file, not a folder")}
    if entry == "m3dt.experiment":
        return {"missing grid file": ([str(missing_yaml)], f"grid file {missing_yaml} does not exist"),
                "bad grid file": ([str(broken_yaml)], f"grid file {broken_yaml} is not valid YAML"),
                "binary grid file": ([str(binary_yaml)], f"grid file {binary_yaml} is not valid YAML: not UTF-8 text"),
                "unknown option": ([str(broken_yaml), "--no_such_option"], "unrecognized arguments: --no_such_option"),
                "bad option value": ([str(broken_yaml), "--launcher", "pbs"], "argument --launcher: invalid choice"),
                "out-of-range number": ([str(broken_yaml), "--shard", "4/2"], "--shard must be g/N with 0 <= g < N")}
    if entry == "m3dt.collect":
        out = ["--out", str(tmp / "data")]
        return {"unknown option": ([*out, "--tasks", "reach-v2", "--episodes", "3", "--no_such_option"],
                                   "unrecognized arguments: --no_such_option"),
                "missing task list file": ([*out, "--tasks", f"@{nowhere}.json", "--episodes", "3"],
                                                             f"{nowhere}.json: task list file does not exist"),
                "bad option value": ([*out, "--tasks", "reach-v2", "--episodes", "many"],
                                     "argument --episodes: invalid int value: 'many'"),
                "out-of-range number": ([*out, "--tasks", "reach-v2", "--episodes", "2"], "--episodes must be at least 3"),
                "out is a file": (["--out", str(a_file), "--tasks", "reach-v2", "--episodes", "3"],
                                  f"{a_file}: data root (--out) is a file, not a folder"),
                "expert's out is a file": (["train-expert", "--expert", "ant_dir", "--out", str(a_file)],
                                           f"{a_file}: data root (--out) is a file, not a folder")}
    if entry == "m3dt.demo":
        return {**config_file, **unknown_option,
                "bad option value": (["--grouping", "kmeans"], "argument --grouping: invalid choice: 'kmeans'"),
                "missing task list file": (["--tasks", f"@{nowhere}.json"], f"{nowhere}.json: task list file does not exist"),
                "task list not a list": (["--tasks", f"@{tmp / 'tasks.json'}"],
                                         f"{tmp / 'tasks.json'}: task list file must hold a JSON list of task names"),
                "out-of-range number": (["--demo_episodes", "2"], "--demo_episodes must be at least 3, got 2")}
    if entry == "m3dt.bench":
        return {**unknown_option,
                "bad option value": (["--precision", "fp16"], "argument --precision: invalid choice: 'fp16'"),
                "bad device": (["--device", "tpu:x"], "--device 'tpu:x' is not a device name"),
                "bad expert counts": (["--experts", "8,many"], "--experts must be comma-separated counts"),
                "out-of-range number": (["--steps", "0"], "--steps must be at least 1, got 0"),
                "zero env steps": (["--env_steps", "0"], "--env_steps must be at least 1, got 0"),
                "zero groups": (["--groups", "0"], "--groups must be at least 1, got 0"),
                "zero eval rows": (["--eval_rows", "0"], "--eval_rows must be at least 1, got 0"),
                "bad stages": (["--stages", "1,x"], "--stages must be comma-separated stages of 1, 2, 3, got '1,x'"),
                "no such stage": (["--stages", "4"], "--stages must be comma-separated stages of 1, 2, 3"),
                "more tasks than MT160": (["--tasks", "200"], "--tasks must be at most 160 (the MT160 list), got 200"),
                "more groups than tasks": (["--tasks", "4", "--groups", "8"], "--groups 8 is more experts than the 4 tasks"),
                "bad model size": (["--embed_dim", "30", "--n_head", "8"], "--embed_dim 30 must be a multiple of --n_head 8"),
                "out is a file": (["--out", str(a_file)], f"{a_file}: bench folder (--out) is a file, not a folder")}
    if entry == "m3dt.memory":
        return {"unknown option": (["table", "--no_such_option"], "unrecognized arguments: --no_such_option"),
                "bad option value": (["check", "--precision", "fp16"], "argument --precision: invalid choice: 'fp16'"),
                "bad device": (["check", "--device", "tpu:x"], "--device 'tpu:x' is not a device name"),
                "out is a folder": (["check", "--device", "cpu", "--out", str(tmp)],
                                    f"{tmp}: --out file is a folder; give a file name")}
    raise AssertionError(entry)


def run_in_process(entry: str, argv: list[str], monkeypatch) -> int:
    """Run a Python entry point as its command line would; returns the exit code."""
    with pytest.raises(SystemExit) as exited:
        if entry in STAGE_SCRIPTS:
            monkeypatch.setattr(sys, "argv", [entry, *argv])
            runpy.run_path(str(REPO / entry), run_name="__main__")
        else:
            MODULES[entry](argv)
    return exited.value.code


CASES = [(entry, case) for entry in (*STAGE_SCRIPTS, *MODULES) for case in bad_inputs(entry, Path("/nonexistent"))]


@pytest.mark.parametrize("entry, case", CASES, ids=[f"{entry}: {case}" for entry, case in CASES])
def test_bad_input_is_one_line_with_exit_code_2(entry, case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # nothing a command might create lands in the repository
    (tmp_path / "broken.yaml").write_text("embed_dim: [32\n")
    (tmp_path / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    (tmp_path / "tasks.json").write_text('{"reach-v2": 1}')  # JSON, but not a list of names
    argv, message = bad_inputs(entry, tmp_path)[case]
    code = run_in_process(entry, argv, monkeypatch)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("error: "), err
    assert message in err


SHELL_CASES = ["missing config file", "bad option value", "out-of-range number", "missing run dir"]


@pytest.mark.parametrize("case", SHELL_CASES)
def test_bad_input_to_the_shell_script_is_one_line(case, tmp_path):
    (tmp_path / "broken.yaml").write_text("embed_dim: [32\n")
    argv, message = bad_inputs(SHELL_SCRIPT, tmp_path)[case]
    environment = {**os.environ, "PYTHON": sys.executable, "GPUS": "0"}
    result = subprocess.run(["bash", str(REPO / SHELL_SCRIPT), *argv, "--device", "cpu"], capture_output=True,
                            text=True, cwd=tmp_path, env=environment, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: ") and message in result.stderr
