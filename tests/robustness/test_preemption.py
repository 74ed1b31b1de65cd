"""Preemption: a real ``emo fit`` process gets SIGTERM / SIGUSR1, saves ``last.ckpt``, exits 0, and
``--ckpt_path last`` resumes at the same step and data position (bit-for-bit up to float tolerance)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from emo_lightning.cli import main

ROOT = Path(__file__).resolve().parents[2]


def start_fit(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "emo_lightning.cli", "fit", *args],
            cwd=ROOT,
            env=full_env,
            stdout=out,
            stderr=out,
        )


def wait_for(pattern: str, folder: Path, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not list(folder.glob(pattern)):
        assert proc.poll() is None, f"emo fit ended early with {proc.returncode}"
        assert time.monotonic() < deadline, f"no {pattern} in {folder} after {timeout} s"
        time.sleep(0.2)


def interrupt(args: list[str], ckpts: Path, log: Path, signum: int, env: dict | None = None) -> dict:
    proc = start_fit(args, log, env)
    try:
        wait_for("step*.ckpt", ckpts, proc)  # training is running (a periodic checkpoint exists)
        os.kill(proc.pid, signum)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    return torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)


def test_sigterm_saves_and_resumes_exactly(tmp_path: Path, make_shards, emo_args) -> None:
    train = make_shards(40)
    common = ["--trainer.accumulate_grad_batches", "2", "--checkpoint.every_n_train_steps", "3"]
    args = emo_args(tmp_path / "a", train, *common, "--trainer.max_steps", "100000")
    ckpt = interrupt(args, tmp_path / "a" / "emo_tiny" / "checkpoints", tmp_path / "a.log", signal.SIGTERM)
    step = ckpt["global_step"]
    assert step >= 3
    assert ckpt["ShardDataModule"] == {
        "train_batches": 2 * step
    }  # data position at an optimizer-step boundary
    assert f"SIGTERM received: checkpoint of step {step} saved" in (tmp_path / "a.log").read_text()

    # resume for 2 more steps, and compare with an uninterrupted run of step + 2 steps
    main(
        [
            "fit",
            *emo_args(
                tmp_path / "a", train, *common, "--trainer.max_steps", str(step + 2), "--ckpt_path", "last"
            ),
        ]
    )
    main(["fit", *emo_args(tmp_path / "b", train, *common, "--trainer.max_steps", str(step + 2))])
    resumed, straight = (
        torch.load(
            tmp_path / run / "emo_tiny" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
        )
        for run in ("a", "b")
    )
    assert resumed["global_step"] == straight["global_step"] == step + 2
    assert resumed["ShardDataModule"] == straight["ShardDataModule"]
    for name, tensor in straight["state_dict"].items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            torch.testing.assert_close(resumed["state_dict"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_sigusr1_saves_exits_cleanly_and_requeues_under_slurm(tmp_path: Path, make_shards, emo_args) -> None:
    train = make_shards(40)
    bin_dir = tmp_path / "bin"  # stands in for SLURM's scontrol: records its arguments
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "requeued"}\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {"SLURM_JOB_ID": "4242", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    args = emo_args(
        tmp_path / "a", train, "--checkpoint.every_n_train_steps", "3", "--trainer.max_steps", "100000"
    )
    ckpt = interrupt(
        args, tmp_path / "a" / "emo_tiny" / "checkpoints", tmp_path / "a.log", signal.SIGUSR1, env
    )
    step = ckpt["global_step"]
    assert step >= 3 and ckpt["ShardDataModule"] == {"train_batches": step}
    assert f"SIGUSR1 received: checkpoint of step {step} saved" in (tmp_path / "a.log").read_text()
    assert (tmp_path / "requeued").read_text().split() == ["requeue", "4242"]
