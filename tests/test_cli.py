"""The command line, through click's CliRunner and one real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from samcache import __version__
from samcache.cli import main
from tests.helpers import make_coco, write_image


def _commands(group, prefix=()):
    for name, command in group.commands.items():
        yield prefix + (name,), command
        if hasattr(command, "commands"):
            yield from _commands(command, prefix + (name,))


def test_help_lists_commands_and_each_has_an_example():
    runner = CliRunner()
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in main.commands:
        assert name in result.output
    for path, command in _commands(main):
        if hasattr(command, "commands"):
            continue
        out = runner.invoke(main, [*path, "--help"])
        assert out.exit_code == 0, path
        assert "Example" in out.output and f"samcache {' '.join(path)}" in out.output, path


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "samcache", "--version"], capture_output=True, text=True, check=True)
    assert __version__ in out.stdout


def test_data_check_json(coco_dir):
    result = CliRunner().invoke(main, ["data", "check", str(coco_dir), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert {"images", "objects", "splits", "problems"} <= set(summary)
    assert summary["images"] == 4 and summary["objects"] == 5 and summary["problems"] == []


def test_data_check_reports_problems_and_strict_fails(tmp_path):
    write_image(tmp_path / "images" / "a.png", 20, 20)
    images = [{"id": 1, "file_name": "a.png", "width": 20, "height": 20},
              {"id": 2, "file_name": "../escape.png", "width": 20, "height": 20}]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "segmentation": [[0, 0, 5, 0, 5, 5, 0, 5]]}]
    path = make_coco(tmp_path, images, anns, "all.json")
    runner = CliRunner()
    lenient = runner.invoke(main, ["data", "check", str(path)])
    assert lenient.exit_code == 0
    assert "1 images, 1 objects" in lenient.output and "1 problem(s)" in lenient.output
    assert "image id 2 (../escape.png)" in lenient.output
    strict = runner.invoke(main, ["data", "check", str(path), "--strict"])
    assert strict.exit_code == 1 and "strict mode" in strict.output and "all.json" in strict.output


def test_data_check_unreadable_dataset_exits_non_zero(tmp_path):
    result = CliRunner().invoke(main, ["data", "check", str(tmp_path / "missing")])
    assert result.exit_code == 1 and "does not exist" in result.output


def test_bad_split_fractions_are_a_usage_error(coco_dir):
    result = CliRunner().invoke(main, ["data", "check", str(coco_dir), "--split-fractions", "0.5,x"])
    assert result.exit_code == 2 and "0.8,0.1,0.1" in result.output


def test_data_stamps_then_check(tmp_path):
    runner = CliRunner()
    out = tmp_path / "stamps"
    result = runner.invoke(main, ["data", "stamps", "--out", str(out), "--n", "4", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "wrote 4 pages" in result.output
    check = runner.invoke(main, ["data", "check", str(out), "--json", "--strict"])
    assert check.exit_code == 0, check.output
    summary = json.loads(check.output)
    assert summary["images"] == 4 and summary["objects"] >= 4 and summary["problems"] == []


@pytest.mark.parametrize("argv", [["fetch", "vit_x"], ["data", "check"]])
def test_usage_errors_exit_2(argv):
    assert CliRunner().invoke(main, argv).exit_code == 2


def test_progress_in_a_log_is_a_few_plain_lines(tmp_path):
    """Output that is not a terminal (CI logs, nohup, pipes) gets lines, not carriage-return frames."""
    result = subprocess.run([sys.executable, "-m", "samcache", "data", "stamps", "--out", str(tmp_path / "s"),
                             "--n", "30"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("stamps:")]
    assert "\r" not in result.stderr
    assert 2 <= len(lines) <= 11 and lines[-1].startswith("stamps: 30/30 page (100%)")


def test_line_progress_prints_every_tenth_and_at_the_end():
    import io

    from samcache.progress import LineProgress

    stream = io.StringIO()
    bar = LineProgress(100, desc="embed", unit="img", stream=stream, every_seconds=1e9)
    for _ in range(95):
        bar.update(1)
    bar.set_postfix(failed=0)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == [f"{n}/100" for n in range(10, 100, 10)] + ["95/100"]
    assert lines[-1].endswith("failed=0") and "(95%)" in lines[-1]
