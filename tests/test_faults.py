"""Fault tolerance: `mmgen train` and `mmgen eval` killed with SIGKILL and restarted, and a disk that fills up
while a checkpoint is written. Nothing is lost, nothing is done twice, and no half-written file is read.

The kill points are random; the seed is printed in every failure message, so a failing schedule can be
replayed with `MMGEN_FAULT_SEED`.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmgen.cli import main
from mmgen.config import ModelArguments, TrainArguments, parse_config
from mmgen.training import CHECKPOINT, STATE_FILE, Trainer, latest_checkpoint

from .test_training import read_log, vae_dir, write_config  # noqa: F401 (vae_dir is a fixture)

SEED = int(os.environ.get("MMGEN_FAULT_SEED", random.SystemRandom().randrange(10**6)))
STEPS, SAVE_EVERY = 10, 2


def cli(*args: str) -> subprocess.Popen:
    """`mmgen ARGS` as a child process, the way a user starts it, on one thread like the tests in here
    (the same thread count gives the same floating-point sums, so losses compare exactly)."""
    return subprocess.Popen([sys.executable, "-m", "mmgen.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for(condition, proc: subprocess.Popen, what: str, poll: float = 0.005, timeout: float = 900):
    """Poll until `condition()` holds; fail if the process ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"the process ended (code {proc.returncode}) before {what} [seed {SEED}]")
        time.sleep(poll)
    pytest.fail(f"timed out waiting for {what} [seed {SEED}]")


def logged_step(run: Path) -> int:
    """The last step in the training log (0 before the first)."""
    try:
        lines = (run / "log.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (FileNotFoundError, ValueError, KeyError):
        return 0  # not written yet, or its last line is half-written right now


def checkpoint_step(run: Path) -> int:
    try:
        return json.loads((run / CHECKPOINT / STATE_FILE).read_text())["step"]
    except (FileNotFoundError, ValueError):
        return 0


def assert_complete(checkpoint: Path) -> int:
    """Every file of the checkpoint reads back whole; returns its step."""
    for weights in checkpoint.glob("*.safetensors"):
        assert load_file(weights), weights
    for state in checkpoint.glob("*.bin"):
        torch.load(state, weights_only=True)
    return json.loads((checkpoint / STATE_FILE).read_text())["step"]


def test_train_killed_while_or_after_checkpointing_resumes_as_if_never_stopped(tmp_path, vae_dir, one_thread):  # noqa: F811
    rng = random.Random(SEED)
    save_step = rng.choice(range(SAVE_EVERY, STEPS - 2 * SAVE_EVERY + 1, SAVE_EVERY))  # some steps remain after
    during = rng.random() < 0.5
    (tmp_path / "unbroken").mkdir()
    unbroken = write_config(tmp_path / "unbroken", vae_dir, max_steps=STEPS, save_every=SAVE_EVERY)
    reference = {row["step"]: row["loss"] for row in Trainer(*parse_config((ModelArguments, TrainArguments),
                                                                             unbroken)).train()}

    config = write_config(tmp_path, vae_dir, max_steps=STEPS, save_every=SAVE_EVERY)
    run = tmp_path / "run"
    proc = cli("train", str(config))
    # The log row of a step is written just before that step's checkpoint.
    wait_for(lambda: logged_step(run) >= save_step, proc, f"step {save_step} to be logged")
    if during:  # at the first sight of the half-written folder, or as soon as the save is seen done
        wait_for(lambda: (run / f"{CHECKPOINT}.tmp").exists() or checkpoint_step(run) >= save_step, proc,
                 f"checkpoint {save_step} to start", poll=0.0005)
    else:  # during a training step between two checkpoints
        kill_step = rng.randint(save_step + 1, save_step + SAVE_EVERY - 1)
        wait_for(lambda: logged_step(run) >= kill_step, proc, f"step {kill_step} to be logged")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    schedule = f"[seed {SEED}: killed {'while' if during else 'after'} writing checkpoint {save_step}]"
    assert proc.returncode == -signal.SIGKILL, f"the run ended by itself before the kill {schedule}"

    # While writing checkpoint k, the last complete one is k - SAVE_EVERY (none for the first), or k if the
    # renames were done.
    last = latest_checkpoint(run)
    resumes_from = assert_complete(last) if last is not None else 0
    assert (save_step - SAVE_EVERY if during else save_step) <= resumes_from < STEPS, schedule

    assert main(["train", str(config)]) == 0
    rows = read_log(run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), f"one log row per step {schedule}"
    for row in rows:
        assert row["loss"] == pytest.approx(reference[row["step"]], rel=1e-5, abs=1e-6), (row["step"], schedule)
    assert assert_complete(run / CHECKPOINT) == STEPS
    assert not (run / f"{CHECKPOINT}.tmp").exists() and not (run / f"{CHECKPOINT}.old").exists()


def test_eval_killed_mid_run_ends_with_exactly_one_row_per_sample(model_dir, tmp_path, one_thread):
    rng = random.Random(SEED)
    n = 8
    out = tmp_path / "run"
    args = ["eval", "shapesbench", "--model", str(model_dir), "--categories", "colors", "--n", str(n),
            "--batch-size", "1", "--steps", "1", "--no-progress", "-o", str(out)]
    results = out / "results.jsonl"

    def rows_written() -> int:
        return results.read_bytes().count(b"\n") if results.is_file() else 0

    kill_after = rng.randint(1, n // 2)
    proc = cli(*args)
    wait_for(lambda: rows_written() >= kill_after, proc, f"{kill_after} result rows", poll=0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_with = rows_written()
    assert proc.returncode == -signal.SIGKILL and killed_with < n, f"the run finished before the kill [seed {SEED}]"
    with results.open("ab") as f:  # as if the kill had come halfway through writing a row
        f.write(b'{"id": "t2i.colors.00')

    assert main(args) == 0
    ids = [json.loads(line)["id"] for line in results.read_text().splitlines()]
    assert len(ids) == n and len(set(ids)) == n, f"rows: {ids} [seed {SEED}]"
    assert all(i.startswith("t2i.colors.") for i in ids)
    assert json.loads((out / "summary.json").read_text())["n"]["colors"] == n


def test_a_full_disk_while_checkpointing_keeps_the_last_checkpoint_and_says_so(tmp_path, vae_dir, monkeypatch,  # noqa: F811
                                                                              capsys):
    config = write_config(tmp_path, vae_dir, max_steps=SAVE_EVERY, save_every=SAVE_EVERY)
    assert main(["train", str(config)]) == 0
    run = tmp_path / "run"
    before = {p.name: p.read_bytes() for p in (run / CHECKPOINT).iterdir()}
    capsys.readouterr()

    def disk_fills_up(obj, f, *args, **kwargs):
        """The weights went out; the next file gets a few bytes in before the disk is full."""
        Path(f).write_bytes(b"\x80\x02" + bytes(64))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))

    monkeypatch.setattr(torch, "save", disk_fills_up)
    code = main(["train", str(config), "--max_steps", str(2 * SAVE_EVERY)])
    monkeypatch.undo()

    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1, errors
    assert f"could not write the checkpoint of step {2 * SAVE_EVERY}" in errors[0]
    assert "the disk is full" in errors[0] and "previous checkpoint" in errors[0] and "is intact" in errors[0]
    assert {p.name: p.read_bytes() for p in (run / CHECKPOINT).iterdir()} == before
    assert not (run / f"{CHECKPOINT}.tmp").exists(), "the torn checkpoint is removed to give the space back"
    trainer = Trainer(*parse_config((ModelArguments, TrainArguments), config))
    assert trainer.resume() and trainer.step == SAVE_EVERY
