"""The report gathers evaluated runs into tables by task count, method and expert count."""

import json

import pytest

from m3dt.report import build_report, main


def write_result(run_dir, label, method, tasks, experts, total, families):
    path = run_dir / "eval" / label / "results.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({
        "method": method, "num_experts": experts, "total": {"score": total, "tasks": tasks},
        "families": {family: {"score": score, "tasks": 1} for family, score in families.items()},
    }))


def test_report_tables_and_plots(tmp_path):
    for seed, offset in ((0, 0.0), (1, 2.0)):
        run = tmp_path / f"mt10_seed{seed}"
        write_result(run, "stage1", "Prompt-DT", 10, 0, 80.0 + offset, {"metaworld": 70.0 + offset})
        write_result(run, "stage3_gradient_8", "M3DT", 10, 8, 88.0 + offset, {"metaworld": 90.0 + offset})
    write_result(tmp_path / "mt10_e16", "stage3_gradient_16", "M3DT", 10, 16, 85.0, {"metaworld": 86.0})
    report = build_report(sorted(tmp_path.iterdir()), tmp_path / "out")
    assert "| 10 | Prompt-DT | 71.00 ± 1.00 (2) | - | - | - | 81.00 ± 1.00 (2) |" in report
    assert "| 10 | 8 | 91.00 ± 1.00 (2) | - | - | - | 89.00 ± 1.00 (2) |" in report
    assert "| 10 | 16 | 86.00 | - | - | - | 85.00 |" in report
    assert "| M3DT | 89.23 | 80.66 | 78.21 |" in report
    for name in ("report.md", "score_by_tasks.png", "score_by_experts.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0


def test_run_without_evaluation_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert "no eval/*/results.json" in capsys.readouterr().err


def test_report_takes_the_run_dir_of_a_config_file(tmp_path, capsys):
    run = tmp_path / "mt10_seed0"
    write_result(run, "stage1", "Prompt-DT", 10, 0, 80.0, {"metaworld": 70.0})
    config_file = tmp_path / "run.yaml"  # the stages' format
    config_file.write_text(f"run_dir: {run}\nembed_dim: 32\n")
    main(["--config", str(config_file), "--out", str(tmp_path / "out")])
    assert "| 10 | Prompt-DT | 70.00 | - | - | - | 80.00 |" in capsys.readouterr().out
