"""``peftkit serve`` refuses bad arguments with exit status 2 (or 1) and one line naming the flag, before it loads
anything. The server itself, run as a subprocess, is tested in ``tests/serving/test_server.py``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from peftkit import cli

pytest.importorskip("fastapi")  # _serve checks the `serve` extra before it looks at the numbers
pytest.importorskip("uvicorn")

MISSING = "/nonexistent/peftkit-test-base"  # loading it would fail: a test reaching the loader shows in its message


@pytest.mark.parametrize(("flag", "value", "low"), [
    ("--max-loras", "0", 1), ("--max-lora-rank", "0", 1), ("--max-cpu-loras", "-1", 0),
    ("--max-batch-size", "0", 1), ("--port", "-5", 0),
])
def test_serve_refuses_a_count_below_its_minimum_before_loading(flag: str, value: str, low: int, capsys) -> None:
    status = cli.main(["serve", "--base-model", MISSING, flag, value])
    err = capsys.readouterr().err
    assert status == 2
    assert err.strip() == f"peftkit serve: {flag} must be >= {low}, got {value}"


def test_serve_refuses_repeated_adapter_names_naming_them(capsys) -> None:
    status = cli.main(["serve", "--base-model", MISSING, "--adapter", "a=one", "--adapter", "b=two",
                       "--adapter", "a=three"])
    err = capsys.readouterr().err
    assert status == 1
    assert "--adapter names must be unique; repeated: ['a']" in err
    assert MISSING not in err  # refused before the base model was looked for


def test_serve_reports_a_missing_base_model_in_one_line(capsys) -> None:
    status = cli.main(["serve", "--base-model", MISSING])
    err = capsys.readouterr().err
    assert status == 1
    assert err.startswith("peftkit serve: ") and MISSING in err
    assert "Traceback" not in err


@pytest.mark.parametrize(("text", "expected"), [
    ("500000000", 500_000_000), ("500MB", 500 * 10**6), ("500 mb", 500 * 10**6), ("2GiB", 2 * 2**30),
    ("64k", 64_000), ("3Mi", 3 * 2**20), (" 7 ", 7),
])
def test_max_cpu_bytes_reads_decimal_and_binary_units(text: str, expected: int) -> None:
    args = cli._parser().parse_args(["serve", "--base-model", MISSING, "--max-cpu-bytes", text])
    assert args.max_cpu_bytes == expected


@pytest.mark.parametrize("text", ["lots", "2TB", "1.5GB", "-3", ""])
def test_max_cpu_bytes_refuses_what_it_cannot_read(text: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--base-model", MISSING, "--max-cpu-bytes", text])
    assert exit_.value.code == 2
    assert "expected a byte count such as 500000000, 500MB or 2GiB" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["noequals", "=dir", "name="])
def test_adapter_argument_must_be_name_equals_path(value: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--base-model", MISSING, "--adapter", value])
    assert exit_.value.code == 2
    assert f"expected NAME=DIR_OR_HUB_ID, got {value!r}" in capsys.readouterr().err


def test_python_dash_m_peftkit_is_the_same_command(tmp_path: Path) -> None:
    # `python -m peftkit` (peftkit/__main__.py) where the console script is not on PATH.
    done = subprocess.run([sys.executable, "-m", "peftkit", "serve", "--base-model", MISSING, "--max-loras", "0"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "--max-loras must be >= 1, got 0" in done.stderr
    helped = subprocess.run([sys.executable, "-m", "peftkit", "--help"], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert helped.returncode == 0 and "serve" in helped.stdout and helped.stdout.startswith("usage: peftkit")
