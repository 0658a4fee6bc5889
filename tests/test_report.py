"""The report: its statistics against a plain numpy computation on a fixed score table, its rows (one per
task count, method, grouping, expert count, size and evaluation settings), stale results left out, plots."""

import csv
import hashlib
import json

import numpy as np
import pytest

from m3dt import report
from m3dt.report import (build_report, build_rows, find_results, iqm_interval, load_results, main,
                         performance_profiles, profile_curves)
from m3dt.scores import score_axis_limits
from m3dt.tasks import get_task, resolve_tasks
from tests.conftest import REPO

# Per-task scores of 3 seeds x 5 tasks (a fixed table: the statistics below are computed from it by hand).
TASKS = ["cheetah-vel-1", "cheetah-vel-2", "cheetah-vel-3", "ant-dir-1", "ant-dir-2"]
SCORES = np.array([[10.0, 50.0, 90.0, 30.0, 70.0],
                   [20.0, 40.0, 100.0, 0.0, 60.0],
                   [15.0, 55.0, 80.0, 25.0, 65.0]])


def plain_iqm(scores: np.ndarray) -> float:
    """Mean of the middle half of all scores (25% cut from each end)."""
    ordered = np.sort(scores.ravel())
    cut = int(0.25 * ordered.size)
    return float(ordered[cut: ordered.size - cut].mean())


def plain_stratified_bootstrap(scores: np.ndarray, reps: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of the IQM when each task's seeds are resampled with replacement, drawing
    the indices from numpy's global generator as rliable does."""
    np.random.seed(seed)
    seeds, tasks = scores.shape
    estimates = []
    for _ in range(reps):
        rows = np.random.choice(seeds, (seeds, tasks), replace=True)
        estimates.append(plain_iqm(scores[rows, np.arange(tasks)]))
    low, high = np.percentile(estimates, [2.5, 97.5])
    return float(low), float(high)


def test_iqm_and_bootstrap_interval_equal_a_plain_numpy_computation():
    iqm, interval = iqm_interval(SCORES, reps=400, seed=7)
    assert iqm == pytest.approx(plain_iqm(SCORES), abs=1e-12)
    assert interval == pytest.approx(plain_stratified_bootstrap(SCORES, reps=400, seed=7), abs=1e-12)
    assert iqm_interval(SCORES[:1], reps=50, seed=7)[1] is None  # one seed: no interval
    state = np.random.get_state()[1].copy()
    iqm_interval(SCORES, reps=10, seed=3)
    assert np.array_equal(np.random.get_state()[1], state)  # the global generator is left as it was


def test_performance_profile_is_the_fraction_of_scores_above_each_threshold():
    thresholds = np.array([0.0, 25.0, 50.0, 75.0, 99.0])
    profiles, bands = performance_profiles({"row": SCORES}, thresholds, reps=50, seed=0)
    expected = [(SCORES > threshold).mean() for threshold in thresholds]
    np.testing.assert_allclose(profiles["row"], expected)
    assert bands["row"].shape == (2, len(thresholds)) and np.all(bands["row"][0] <= bands["row"][1])
    # every seed scores the same per task: resampling seeds gives no band; resampling tasks too does
    same_over_seeds = np.tile(np.array([10.0, 40.0, 60.0, 90.0]), (3, 1))
    widths = {}
    for task_bootstrap in (False, True):
        profiles, bands = performance_profiles({"row": same_over_seeds}, np.array([50.0]), reps=200, seed=0,
                                               task_bootstrap=task_bootstrap)
        assert profiles["row"][0] == 0.5
        widths[task_bootstrap] = bands["row"][1, 0] - bands["row"][0, 0]
    assert widths[False] == 0.0 and 0.5 <= widths[True] <= 1.0


def write_result(run_dir, label, method, method_id, seed, scores, experts=0, grouping=None, full=True,
                 checkpoint=None, tasks=TASKS, training_seed=None):
    rows = {task: {"family": get_task(task).family, "score": score, "episodes": 1, "reference_score": 90.0}
            for task, score in zip(tasks, scores)}
    families = {family: {"score": float(np.mean([r["score"] for r in rows.values() if r["family"] == family])),
                         "reference_score": 90.0, "tasks": sum(r["family"] == family for r in rows.values())}
                for family in {r["family"] for r in rows.values()}}
    data = {"method": method, "method_id": method_id, "grouping": grouping, "num_experts": experts, "seed": seed,
            "protocol": {"full": full, "episodes": None, "max_steps": None if full else 20,
                         "note": "" if full else "episodes cut at 20 steps"},
            "checkpoint": checkpoint, "tasks": rows, "families": families,
            "training_seed": seed if training_seed is None else training_seed,
            "total": {"score": float(np.mean(scores)), "tasks": len(tasks), "reference_score": 90.0}}
    path = run_dir / "eval" / label / "results.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(data))
    return path


def checkpoint_file(run_dir, content: bytes) -> dict:
    path = run_dir / "stage1" / "backbone.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return {"path": "stage1/backbone.safetensors", "sha256": hashlib.sha256(content).hexdigest()}


def test_report_rows_paper_numbers_stale_results_and_plots(tmp_path):
    root = tmp_path / "runs"
    for seed in range(3):
        run = root / f"loco_seed{seed}"
        write_result(run, "stage1", "Prompt-DT", "prompt-dt", seed, SCORES[seed], checkpoint=checkpoint_file(run, b"w"))
        # one run, two groupings: two rows, not one row of "2 seeds"
        write_result(run, "stage3_gradient_4", "M3DT", "m3dt", seed, SCORES[seed] + 5, experts=4, grouping="gradient")
        write_result(run, "stage3_random_4", "M3DT", "m3dt", seed, SCORES[seed] + 1, experts=4, grouping="random")
    write_result(root / "loco_seed0", "stage1_short", "Prompt-DT", "prompt-dt", 0, SCORES[0] - 10, full=False,
                 checkpoint=checkpoint_file(root / "loco_seed0", b"w"))
    stale = root / "loco_seed3"
    recorded = checkpoint_file(stale, b"old weights")
    checkpoint_file(stale, b"weights trained again")
    write_result(stale, "stage1", "Prompt-DT", "prompt-dt", 3, SCORES[0], checkpoint=recorded)

    text = build_report([root], tmp_path / "out", reps=200, seed=0)
    totals = SCORES.mean(axis=1)
    mean, std = totals.mean(), totals.std(ddof=1)
    lines = text.splitlines()
    prompt_dt = next(line for line in lines if "| Prompt-DT |" in line and "| full protocol |" in line)
    assert f"{mean:.2f} ± {std:.2f}" in prompt_dt and "| 3 (0, 1, 2) |" in prompt_dt
    assert f"{plain_iqm(SCORES):.2f} [" in prompt_dt
    random_grouping = next(line for line in lines if "M3DT (random grouping)" in line)
    assert f"{mean + 1:.2f} ± {std:.2f}" in random_grouping and "| 3 (0, 1, 2) |" in random_grouping
    short = next(line for line in lines if "NOT full protocol" in line and "Prompt-DT" in line)
    assert "(1 seed: no CI)" in short and "<= 20 steps" in short
    assert "not comparable with the paper's numbers" in text
    assert "*paper: M3DT*" not in text  # 5 tasks of our own: no paper number beside them
    assert "loco_seed3" in text.split("## Left out")[1] and "sha256 differs" in text  # stale: listed, not counted
    assert "| 3 (0, 1, 2, 3) |" not in text

    with open(tmp_path / "out" / "report.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 4  # Prompt-DT full, Prompt-DT short, M3DT gradient, M3DT random
    gradient = next(row for row in rows if row["grouping"] == "gradient")
    assert float(gradient["total_mean"]) == pytest.approx(mean + 5) and gradient["seed_list"] == "0 1 2"
    assert float(gradient["total_std"]) == pytest.approx(std, abs=1e-4)  # written with 4 decimals
    one_seed = next(row for row in rows if row["full_protocol"] == "False")
    assert one_seed["seeds"] == "1" and one_seed["total_std"] == "" and one_seed["cheetah_vel_std"] == ""
    plots = {path.name: path.stat().st_size for path in (tmp_path / "out").glob("*.png")}
    listed = rows[0]["suite"].split("list ")[1]
    assert rows[0]["suite"] == f"loco, list {listed}"  # the grid's suite name, and its task list's hash
    assert sorted(plots) == [f"families_5_tasks_loco_list_{listed}.png", f"profiles_5_tasks_loco_list_{listed}.png",
                             "score_by_experts.png", "score_by_tasks.png"]
    assert min(plots.values()) > 10_000


def test_paper_numbers_stand_beside_the_official_suites_only(tmp_path):
    official = resolve_tasks("mt10", None, 0)
    write_result(tmp_path / "mt10_seed0", "stage3_gradient_8", "M3DT", "m3dt", 0, [50.0] * 10, experts=8,
                 grouping="gradient", tasks=official)
    write_result(tmp_path / "mine_seed0", "stage3_gradient_8", "M3DT", "m3dt", 0, [60.0] * 10, experts=8,
                 grouping="gradient", tasks=official[1:] + ["push-v2" if "push-v2" not in official else "reach-v2"])
    text = build_report([tmp_path], tmp_path / "out", reps=20)
    table = text.split("## Score by number of tasks and method")[1].split("##")[0]
    rows = [line for line in table.splitlines() if "| M3DT |" in line]  # two rows, not one of two seeds
    assert len(rows) == 2 and rows[0].startswith("| 10 (mine, list ") and rows[1].startswith("| 10 (mt10) |")
    assert table.count("*paper: M3DT*") == 1 and "| 10 (mt10) | *paper: M3DT* |" in table
    assert "rows on other task lists have none beside them" in text


def test_report_command_line_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path)])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert "no eval/*/results.json" in error and error.count("\n") == 1 and "Traceback" not in error
    results = write_result(tmp_path / "loco_seed0", "stage1", "Prompt-DT", "prompt-dt", 0, SCORES[0])
    eval_folder = results.parent.parent  # a run's eval/ folder, or one evaluation's: the run directory is wanted
    for argv, message in (([str(results)], f"{results}: is a file, not a folder"),
                          ([str(eval_folder)], f"{eval_folder}: no eval/*/results.json below it (give the run "
                                               "directory, the folder above eval/)"),
                          ([str(results.parent)], f"{results.parent}: no eval/*/results.json below it (give the "
                                                  "run directory, the folder above eval/)"),
                          ([str(tmp_path), "--out", str(results)], f"{results}: report folder (--out) is a file")):
        with pytest.raises(SystemExit):
            main(argv)
        error = capsys.readouterr().err
        assert message in error and error.count("\n") == 1 and "Traceback" not in error
    with pytest.raises(SystemExit):
        main(["--config", str(tmp_path / "missing.yaml")])
    assert "missing.yaml does not exist" in capsys.readouterr().err


def test_a_grid_file_as_config_says_to_give_its_run_root(capsys):
    grid = REPO / "configs" / "experiments" / "paper_table1.yaml"
    with pytest.raises(SystemExit) as stop:
        main(["--config", str(grid)])
    assert stop.value.code == 2 and capsys.readouterr().err == (
        f"error: {grid}: is a grid file (m3dt.experiment): give its run root instead, e.g. python -m m3dt.report "
        "runs/paper\n")


def test_report_takes_the_run_dir_of_a_config_file(tmp_path, capsys):
    run = tmp_path / "loco_seed0"
    write_result(run, "stage1", "Prompt-DT", "prompt-dt", 0, SCORES[0])
    config_file = tmp_path / "run.yaml"  # the stages' format
    config_file.write_text(f"run_dir: {run}\nembed_dim: 32\n")
    main(["--config", str(config_file), "--out", str(tmp_path / "out"), "--bootstrap_reps", "20"])
    assert "| Prompt-DT |" in capsys.readouterr().out and (tmp_path / "out" / "report.md").exists()


def test_tasks_of_ones_own_have_a_column_without_a_paper_reference(tmp_path):
    path = write_result(tmp_path / "own_seed0", "stage1", "Prompt-DT", "prompt-dt", 0, SCORES[0])
    data = json.loads(path.read_text())  # a gymnasium task of a --task_table: no single-task DT reference
    data["tasks"] = {"own-hopper": {"family": "gymnasium", "score": 40.0, "episodes": 10, "reference_score": None}}
    data["families"] = {"gymnasium": {"score": 40.0, "reference_score": None, "tasks": 1}}
    data["total"] = {"score": 40.0, "tasks": 1, "reference_score": None}
    path.write_text(json.dumps(data))
    text = build_report([tmp_path], tmp_path / "out", reps=20)
    assert "| seeds | gymnasium | total (mean ± std) |" in text and "| 40.00 | 40.00 |" in text
    suite = text.split("| 1 (own, list ")[1][:6]
    assert "| tasks | gymnasium | total |\n|---|---|---|\n| 1 (own, list " + suite + ") | - | - |" in text  # no reference
    assert "tasks of one's own (--task_table), each scored 100 x (return - min)" in text
    assert (tmp_path / "out" / f"families_1_tasks_own_list_{suite}.png").stat().st_size > 10_000


def test_variants_are_rows_of_their_own_and_a_seed_twice_is_refused(tmp_path, capsys):
    """A grid's run directories `{suite}_seed{seed}_{variant}` (other options) are rows of their own, never
    more seeds of the plain runs; the same seed from two run roots is refused with one line."""
    for seed in range(2):
        write_result(tmp_path / "runs" / f"loco_seed{seed}", "stage1", "Prompt-DT", "prompt-dt", seed, SCORES[seed])
        write_result(tmp_path / "runs" / f"loco_seed{seed}_learning_rate0.001", "stage1", "Prompt-DT", "prompt-dt",
                     seed, SCORES[seed] + 10)
    text = build_report([tmp_path / "runs"], tmp_path / "out", reps=20)
    plain = next(line for line in text.splitlines() if "| Prompt-DT |" in line)
    variant = next(line for line in text.splitlines() if "| Prompt-DT [learning_rate0.001] |" in line)
    totals = SCORES[:2].mean(axis=1)
    assert f"| {totals.mean():.2f} ± {totals.std(ddof=1):.2f} |" in plain and "| 2 (0, 1) |" in plain
    assert f"| {totals.mean() + 10:.2f} ± {totals.std(ddof=1):.2f} |" in variant and "| 2 (0, 1) |" in variant
    # the seed-0 run evaluated again with --seed 1 (eval/stage1_seed1): a row of its own, not a third seed
    write_result(tmp_path / "runs" / "loco_seed0", "stage1_seed1", "Prompt-DT", "prompt-dt", 1, SCORES[2],
                 training_seed=0)
    text = build_report([tmp_path / "runs"], tmp_path / "out", reps=20)
    plain = next(line for line in text.splitlines() if "| Prompt-DT |" in line and "evaluation seed" not in line)
    assert f"| {totals.mean():.2f} ± {totals.std(ddof=1):.2f} |" in plain and "| 2 (0, 1) |" in plain
    other_seed = next(line for line in text.splitlines() if "evaluation seed 1 of a seed-0 run" in line)
    assert f"| {SCORES[2].mean():.2f} |" in other_seed and "| 1 (1) |" in other_seed
    write_result(tmp_path / "old" / "loco_seed0", "stage1", "Prompt-DT", "prompt-dt", 0, SCORES[2])
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / "runs"), str(tmp_path / "old"), "--out", str(tmp_path / "out2")])
    error = capsys.readouterr().err
    assert stop.value.code == 2 and "two results of the same method, settings and seed 0" in error
    assert error.count("\n") == 1 and "Traceback" not in error


BROKEN = {  # what a results.json can hold instead of an evaluation's results -> the reason it is left out
    "truncated JSON": (b'{"method": ', "not valid JSON (Expecting value"),
    "not UTF-8": (b"\x89PNG\r\n\x1a\n\x00\xff", "not valid JSON: not UTF-8 text (byte 0)"),
    "a JSON list": (b"[1, 2]", "not a results file of m3dt.evaluate: holds a JSON list, not an object"),
    "no total": (lambda data: data.pop("total"), "not a results file of m3dt.evaluate: no 'total'"),
    "tasks a list": (lambda data: data.update(tasks=[1, 2]),
                     "not a results file of m3dt.evaluate: 'tasks' is not a score per task"),
    "no protocol field": (lambda data: data["protocol"].pop("full"), "not a results file of m3dt.evaluate: no 'full'"),
}


def break_results(path, defect: str) -> str:
    """Give the results.json at `path` the BROKEN `defect`; return the reason the report should give."""
    change, reason = BROKEN[defect]
    if isinstance(change, bytes):
        path.write_bytes(change)
    else:
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))
    return reason


@pytest.mark.parametrize("defect", BROKEN)
def test_a_broken_results_file_is_left_out_and_listed(tmp_path, capsys, defect):
    for seed in range(2):
        write_result(tmp_path / "runs" / f"loco_seed{seed}", "stage1", "Prompt-DT", "prompt-dt", seed, SCORES[seed])
    broken = write_result(tmp_path / "runs" / "loco_seed2", "stage1", "Prompt-DT", "prompt-dt", 2, SCORES[2])
    reason = break_results(broken, defect)
    main([str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--bootstrap_reps", "20"])
    assert capsys.readouterr().err == ""
    text = (tmp_path / "out" / "report.md").read_text()
    assert "| 2 (0, 1) |" in text  # the other two seeds are reported
    left_out = text.split("## Left out")[1]
    assert "repair or remove these" in left_out and f"- {broken}: {reason}" in left_out
    with open(tmp_path / "out" / "results.csv") as file:
        listed = {row["results"]: row["left_out_because"] for row in csv.DictReader(file)}
    assert len(listed) == 3 and listed[str(broken)].startswith(reason)


@pytest.mark.parametrize("defect", ["truncated JSON", "a JSON list", "no total"])
def test_no_usable_results_file_is_one_line(tmp_path, capsys, defect):
    path = write_result(tmp_path / "loco_seed0", "stage1", "Prompt-DT", "prompt-dt", 0, SCORES[0])
    reason = break_results(path, defect)
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path), "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert stop.value.code == 2 and f"can be reported: each is out of date or unreadable (e.g. {path}: {reason}" in error
    assert error.count("\n") == 1 and "Traceback" not in error and not (tmp_path / "out").exists()


def test_a_rerun_removes_its_own_earlier_plots_only(tmp_path):
    """A rerun into the same --out leaves no plot of a row that is gone; a file of the user's stays."""
    run = tmp_path / "runs" / "loco_seed0"
    write_result(run, "stage1", "Prompt-DT", "prompt-dt", 0, SCORES[0])
    own = write_result(tmp_path / "runs" / "own_seed0", "stage1", "Prompt-DT", "prompt-dt", 0, SCORES[1],
                       tasks=TASKS[:3])
    out = tmp_path / "out"
    build_report([tmp_path / "runs"], out, reps=20)
    first = {path.name for path in out.glob("*.png")}
    (out / "families_mine.png").write_bytes(b"the user's own plot")
    own.unlink()  # its row is gone
    build_report([tmp_path / "runs"], out, reps=20)
    second = {path.name for path in out.glob("*.png")}
    gone = {name for name in first if "_own_" in name}
    assert len(gone) == 2 and second == first - gone | {"families_mine.png"}
    assert json.loads((out / "plots.json").read_text())["plots"] == sorted(second - {"families_mine.png"})


def test_each_profile_band_resamples_what_its_own_interval_does(tmp_path):
    """Prompt-DT: the same tasks (a list of one's own) for every seed, and the same scores: resampling seeds
    gives no band. M3DT: the official mt10 lists, which differ by seed, so its band resamples task positions
    too; one row's lists do not change how the other's band is drawn."""
    scores = np.linspace(5.0, 95.0, 10)  # 5 of the 10 scores are above 50
    for seed in range(3):
        run = tmp_path / "runs" / f"loco_seed{seed}"
        write_result(run, "stage1", "Prompt-DT", "prompt-dt", seed, scores[::2])  # 2 of 5 above 50
        write_result(run, "stage3_gradient_4", "M3DT", "m3dt", seed, scores, experts=4, grouping="gradient",
                     tasks=resolve_tasks("mt10", None, seed))
    rows = build_rows(load_results(find_results([tmp_path / "runs"]))[0], reps=50, seed=0)
    assert sorted(row.bootstrap for row in rows) == ["seeds within tasks",
                                                     "task positions and seeds (task lists differ by seed)"]
    profiles, bands = profile_curves(rows, np.array([50.0]), reps=200, seed=0)
    (prompt_dt,) = [name for name in profiles if name.startswith("Prompt-DT")]
    (m3dt,) = [name for name in profiles if name.startswith("M3DT")]
    assert profiles[prompt_dt][0] == 0.4 and profiles[m3dt][0] == 0.5
    assert bands[prompt_dt][0, 0] == bands[prompt_dt][1, 0] == 0.4
    assert bands[m3dt][1, 0] - bands[m3dt][0, 0] >= 0.3


def test_score_axes_hold_scores_below_0_and_above_100(tmp_path, monkeypatch):
    """A gymnasium task's score is not clipped: the plots' axes used to end at 0, hiding a negative score."""
    assert score_axis_limits([20.0, 80.0]) == (0.0, 100.0)
    assert score_axis_limits([-50.0, 130.0, float("nan")]) == pytest.approx((-59.0, 139.0))  # 5% of 180
    for seed, score in enumerate((-40.0, -60.0)):
        path = write_result(tmp_path / f"own_seed{seed}", "stage1", "Prompt-DT", "prompt-dt", seed, SCORES[0])
        data = json.loads(path.read_text())
        data["tasks"] = {"own-hopper": {"family": "gymnasium", "score": score, "episodes": 10, "reference_score": None}}
        data["families"] = {"gymnasium": {"score": score, "reference_score": None, "tasks": 1}}
        data["total"] = {"score": score, "tasks": 1, "reference_score": None}
        path.write_text(json.dumps(data))
    limits = {}
    monkeypatch.setattr(report, "finish", lambda figure, all_axes, path: limits.update(
        {path.name.split("_")[0]: [axes.get_ylim() for axes in all_axes]}))
    build_report([tmp_path], tmp_path / "out", reps=20)
    lowest = -50.0 - np.std([-40.0, -60.0], ddof=1)  # the error bar's lower end
    assert limits["families"][0][0] < lowest and limits["score"][0][0] < lowest  # per family; by task count


def test_one_task_name_defined_two_ways_is_two_rows(tmp_path):
    """Two task tables may give one name two definitions (another score range, say): their scores are not seeds
    of one row. The task list's hash covers the definitions the evaluations recorded."""
    for seed, high in enumerate((-150.0, -2500.0)):
        path = write_result(tmp_path / f"own_seed{seed}", "stage1", "Prompt-DT", "prompt-dt", seed, SCORES[0])
        data = json.loads(path.read_text())
        data["tasks"] = {"my-pendulum": {"family": "gymnasium", "score": 50.0, "episodes": 10, "reference_score": None}}
        data["families"] = {"gymnasium": {"score": 50.0, "reference_score": None, "tasks": 1}}
        data["total"] = {"score": 50.0, "tasks": 1, "reference_score": None}
        data["user_tasks"] = [{"task": "my-pendulum", "env_id": "Pendulum-v1", "obs_dim": 3, "act_dim": 1,
                               "horizon": 200, "return_target": -150.0, "rtg_scale": 100.0,
                               "score_min_return": -5000.0 if seed else -1200.0, "score_max_return": high}]
        path.write_text(json.dumps(data))
    text = build_report([tmp_path], tmp_path / "out", reps=20)
    rows = [line for line in text.split("## Score by number of tasks and method")[1].split("##")[0].splitlines()
            if "| Prompt-DT |" in line]
    assert len(rows) == 2 and all("| 1 (0) |" in row or "| 1 (1) |" in row for row in rows), rows


def test_series_at_one_task_count_are_drawn_side_by_side(tmp_path, monkeypatch):
    """Every method at one task count was drawn on one x, its error bars over the others'."""
    for seed in range(2):
        run = tmp_path / f"loco_seed{seed}"
        write_result(run, "stage1", "Prompt-DT", "prompt-dt", seed, SCORES[seed])
        write_result(run, "baseline_mtdt", "MTDT", "mtdt", seed, SCORES[seed] - 2)
        for experts in (2, 4):
            write_result(run, f"stage3_gradient_{experts}", "M3DT", "m3dt", seed, SCORES[seed] + experts, experts=experts,
                         grouping="gradient")
    drawn = {}
    monkeypatch.setattr(report, "finish", lambda figure, all_axes, path: drawn.update(
        {path.name: ([line.get_xdata() for line in all_axes[0].lines if line.get_marker() == "o"],
                     list(all_axes[0].get_xticks()))}))
    build_report([tmp_path], tmp_path / "out", reps=20)
    by_tasks, ticks = drawn["score_by_tasks.png"]
    xs = sorted(float(x) for line in by_tasks for x in line)
    assert len(by_tasks) == 3 and len(set(xs)) == 3  # Prompt-DT, MTDT, M3DT (one count): three x positions
    assert ticks == [5] and 5 / 10 ** 0.04 <= xs[0] < xs[-1] <= 5 * 10 ** 0.04  # within the spread, around 5
    assert xs[-1] / xs[0] == pytest.approx(10 ** report.LOG_DODGE)
    by_experts, ticks = drawn["score_by_experts.png"]
    assert ticks == [2, 4] and len(by_experts) == 1  # one series: not moved
    assert [float(x) for x in by_experts[0]] == [2.0, 4.0]


def test_own_tasks_in_an_mt160_family_have_their_tables_reference(tmp_path, monkeypatch):
    """A task table's dmc task with a single_task_score was labelled as the paper's single-task DT."""
    assert report.reference_label(["walker-walk"], set()) == "single-task DT (paper, full protocol)"
    assert report.reference_label(["walker-walk", "acrobot-swingup-sparse"], {"acrobot-swingup-sparse"}) == (
        "single-task DT (paper, full protocol; own tasks: your task table's)")
    assert report.reference_label(["acrobot-swingup-sparse"], {"acrobot-swingup-sparse"}) == (
        "single-task score (your task table's)")
    for seed in range(2):
        path = write_result(tmp_path / f"own_seed{seed}", "stage1", "Prompt-DT", "prompt-dt", seed, SCORES[seed])
        data = json.loads(path.read_text())
        data["tasks"] = {"acrobot-swingup-sparse": {"family": "dmc", "score": 40.0 + seed, "episodes": 10,
                                                    "reference_score": 55.0}}
        data["user_tasks"] = [{"task": "acrobot-swingup-sparse", "family": "dmc", "single_task_score": 55.0}]
        data["families"] = {"dmc": {"score": 40.0 + seed, "reference_score": 55.0, "tasks": 1}}
        data["total"] = {"score": 40.0 + seed, "tasks": 1, "reference_score": 55.0}
        path.write_text(json.dumps(data))
    labels = {}
    monkeypatch.setattr(report, "finish", lambda figure, all_axes, path: labels.update(
        {path.name.split("_")[0]: [axes.get_legend_handles_labels()[1] for axes in all_axes]}))
    text = build_report([tmp_path], tmp_path / "out", reps=20)
    assert "single-task score (your task table's)" in labels["families"][0]
    assert "not the paper's" in text and "their task table's single_task_score):" in text
    assert "| 55.00 |" in text  # the table's reference, in the reference table
