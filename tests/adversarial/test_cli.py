"""The corpus through the `mmgen` command: one line on stderr that names the problem, a non-zero exit code,
and no traceback; or a written answer for a sane case.

Most cases call `mmgen.cli.main` in this process (an escaped exception would fail the test just as a
traceback would fail a user); a few run the real executable, among them the one input only a process
can receive: an argument that is not valid UTF-8.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mmgen.cli import main

from .cases import BY_NAME, CLI_FLAGS, FILES, IMAGES, MODELS, Case, cases_for
from .conftest import FAST

FAST_FLAGS = [flag for name, value in FAST.items() for flag in (CLI_FLAGS[name], str(value))]


def generate_argv(case: Case, model: Path, folder: Path) -> list[str]:
    argv = ["generate", case.text, "--model", str(model), "-o", str(folder / "out"), *FAST_FLAGS]
    for name, value in case.params.items():
        argv += [CLI_FLAGS[name], str(value)]
    if case.image:
        argv += ["--image", str(IMAGES[case.image](folder))]
    return argv


def file_argv(case: Case, model: Path, folder: Path) -> list[str]:
    reader, build = FILES[case.file]
    path = str(build(folder))
    if reader == "train":
        return ["train", path]
    return ["eval", "interleaved", "--benchmark", "isg", "--data", path, "--model", str(model),
            "-o", str(folder / "run"), "--steps", "1", "--max-new-tokens", "4"]


def check_outcome(expected: str | None, code: int, stderr: str, out_dir: Path) -> None:
    assert "Traceback" not in stderr
    if expected is None:
        assert code == 0, stderr[-2000:]
        assert (out_dir / "output.md").is_file()
        return
    assert code == 2
    errors = [line for line in stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and errors[0].startswith("mmgen "), stderr[-2000:]
    assert re.search(expected, errors[0]), f"{expected!r} not in {errors[0]!r}"
    assert stderr.rstrip().endswith(errors[0]), "the error is the last thing printed"


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's usage errors
        code = stop.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", cases_for("cli", kind="generate"))
def test_generate(case, model_dir, tmp_path, capsys):
    code, stderr = run_main(generate_argv(case, model_dir, tmp_path), capsys)
    check_outcome(case.expected("cli"), code, stderr, tmp_path / "out")


@pytest.mark.parametrize("case", cases_for("cli", kind="model"))
def test_model_folder(case, model_dir, tmp_path, capsys):
    folder = MODELS[case.model](model_dir, tmp_path / "model")
    code, stderr = run_main(generate_argv(Case("plain"), folder, tmp_path), capsys)
    check_outcome(case.expected("cli"), code, stderr, tmp_path / "out")


@pytest.mark.parametrize("case", cases_for("cli", kind="file"))
def test_data_and_config_file(case, model_dir, tmp_path, capsys):
    code, stderr = run_main(file_argv(case, model_dir, tmp_path), capsys)
    check_outcome(case.expected("cli"), code, stderr, tmp_path / "out")


def test_output_folder_that_is_a_file_is_refused_before_generating(model_dir, tmp_path, capsys):
    (tmp_path / "out").write_text("a file")
    code, stderr = run_main(generate_argv(Case("plain"), model_dir, tmp_path), capsys)
    check_outcome("output folder .*out is a file", code, stderr, tmp_path / "out")


@pytest.mark.parametrize("argument, case", [
    (b"draw a \xff circle", BY_NAME["lone_surrogate"]),  # bytes that are not UTF-8 reach Python as surrogates
    ("describe it.", BY_NAME["decompression_bomb_20000"]),
    ("draw a circle.", BY_NAME["model_backbone_in_pickle"]),
], ids=["argument_not_utf8", "bomb_image", "pickle_model"])
def test_the_real_executable(argument, case, model_dir, tmp_path):
    model = MODELS[case.model](model_dir, tmp_path / "model") if case.model else model_dir
    argv = generate_argv(case, model, tmp_path)
    argv[1] = argument
    result = subprocess.run([sys.executable, "-m", "mmgen.cli", *argv], capture_output=True, timeout=900,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    check_outcome(case.error, result.returncode, result.stderr.decode("utf-8", "replace"), tmp_path / "out")


@pytest.mark.parametrize("dtype, expected", [("bfloat16", None), ("half", "dtype must be one of float32, bfloat16")])
def test_generate_loads_the_model_in_the_dtype_asked_for(dtype, expected, model_dir, tmp_path, capsys):
    code, stderr = run_main([*generate_argv(Case("plain"), model_dir, tmp_path), "--dtype", dtype], capsys)
    check_outcome(expected, code, stderr, tmp_path / "out")


@pytest.mark.parametrize("interval, expected", [
    (["0", "0.5"], None),
    (["0.8", "0.2"], r"cfg_interval must be \(low, high\) with 0 <= low <= high <= 1, got \(0\.8, 0\.2\)"),
])
def test_generate_takes_the_guidance_interval(interval, expected, model_dir, tmp_path, capsys):
    code, stderr = run_main([*generate_argv(Case("plain"), model_dir, tmp_path), "--cfg-interval", *interval], capsys)
    check_outcome(expected, code, stderr, tmp_path / "out")
