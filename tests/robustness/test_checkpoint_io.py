"""Checkpoint faults: SIGKILL during writes and training, truncated / bit-flipped ``last.ckpt``, an unwritable
folder, a file-size limit at start-up and at save time, a write failing half-way, another model config."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import pytest
import torch

from emo_lightning.callbacks.safe_checkpoint import AtomicCheckpointIO, SafeModelCheckpoint
from emo_lightning.checkpoint import (
    CheckpointDirError,
    CheckpointWriteError,
    CorruptCheckpointError,
    atomic_save,
    is_complete_checkpoint,
    remove_stale_temporaries,
    tensor_bytes,
)
from emo_lightning.checkpoint.files import TMP_SUFFIX
from emo_lightning.cli import main

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """A real ``ulimit -f`` for this process (writes past ``limit`` bytes fail with EFBIG)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


# ------------------------------------------------------------------ SIGKILL
WRITER = """
import sys, torch
from emo_lightning.checkpoint import atomic_save
blob = torch.arange(2**21, dtype=torch.float32)
i = 0
while True:
    print(i, flush=True)  # about to write checkpoint i (checkpoint i - 1 is complete)
    atomic_save({"i": i, "blob": blob}, sys.argv[1])
    i += 1
"""


def kill_while_writing(proc: subprocess.Popen, path: Path, min_bytes: int = 0, timeout: float = 180) -> Path:
    """SIGKILL ``proc`` while it rewrites checkpoint ``path``: poll for its temporary file holding at least
    ``min_bytes``, freeze the writer (SIGSTOP), check the temporary is still there (not yet renamed), kill it.
    Returns the temporary the kill interrupted."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint write was caught"
        for tmp in path.parent.glob(f".{path.name}.*{TMP_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                if tmp.stat().st_size >= min_bytes:
                    proc.send_signal(signal.SIGSTOP)
                    if tmp.exists() and tmp.stat().st_size >= min_bytes:  # frozen mid-write
                        proc.send_signal(signal.SIGKILL)
                        proc.wait()
                        return tmp
                    proc.send_signal(signal.SIGCONT)  # renamed in between: catch the next write
        time.sleep(0.001)


@pytest.mark.parametrize("min_bytes", [0, 2 * 2**20, 6 * 2**20], ids=["opened", "2MB-written", "6MB-written"])
def test_sigkill_during_checkpoint_writes_never_leaves_a_broken_file(tmp_path: Path, min_bytes: int) -> None:
    """An 8 MB checkpoint rewritten in a loop, the writer killed while its temporary holds ``min_bytes``: the
    previous checkpoint is intact and the temporary is what start-up clean-up removes."""
    path = tmp_path / "last.ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip() == "2":  # checkpoints 0 and 1 are complete
                break
        tmp = kill_while_writing(proc, path, min_bytes)
    finally:
        if proc.poll() is None:
            proc.kill()
    writing = int(["2", *proc.stdout.read().split()][-1])  # the checkpoint being written when the kill landed
    assert tmp.exists()  # the kill landed before the rename
    assert is_complete_checkpoint(path)
    data = torch.load(path, weights_only=True)
    assert data["i"] == writing - 1 and torch.equal(data["blob"], torch.arange(2**21, dtype=torch.float32))
    assert remove_stale_temporaries(tmp_path) == [tmp]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_sigkill_during_training_then_resume_last(tmp_path: Path, make_shards, emo_args) -> None:
    """A run killed while it rewrites ``last.ckpt`` resumes from the previous one, intact; start-up removes the
    temporary the kill left."""
    train = make_shards(30)
    args = emo_args(tmp_path, train, "--checkpoint.every_n_train_steps", "1")
    ckpts = tmp_path / "emo_tiny" / "checkpoints"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with (tmp_path / "log").open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "emo_lightning.cli", "fit", *args, "--trainer.max_steps", "100000"],
            cwd=ROOT, env=env, stdout=log, stderr=log,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not (ckpts / "step0000004.ckpt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()[-2000:]
            time.sleep(0.05)
        tmp = kill_while_writing(proc, ckpts / "last.ckpt")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert tmp.exists()
    saved = sorted(ckpts.glob("step*.ckpt"))
    assert saved and all(is_complete_checkpoint(p) for p in [*saved, ckpts / "last.ckpt"])
    step = torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"]
    # the kill landed while last.ckpt was rewritten for step N, after step N's own file: last.ckpt holds N - 1
    assert saved[-1].name == f"step{step + 1:07d}.ckpt"
    main(["fit", *args, "--trainer.max_steps", str(step + 1), "--ckpt_path", "last"])
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == step + 1
    assert not tmp.exists() and not list(ckpts.glob(f".*{TMP_SUFFIX}"))  # removed at start-up


# ------------------------------------------------------------------ broken last.ckpt
@pytest.mark.parametrize("damage", ["truncate", "bitflip"])
def test_broken_last_is_skipped_for_the_newest_complete(
    tmp_path: Path, make_shards, tiny, damage, caplog
) -> None:
    tiny_module, tiny_data, tiny_trainer = tiny
    train = make_shards(30)
    ckpts = tmp_path / "ckpts"

    def callback() -> SafeModelCheckpoint:
        return SafeModelCheckpoint(dirpath=ckpts, save_last=True, every_n_train_steps=1, save_top_k=-1)

    tiny_trainer(2, [callback()]).fit(tiny_module(), datamodule=tiny_data(train))
    last = ckpts / "last.ckpt"
    data = bytearray(last.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]  # what a non-atomic writer killed mid-write leaves
    else:
        data[len(data) // 2] ^= 0xFF  # silent corruption on disk
    last.write_bytes(bytes(data))
    assert not is_complete_checkpoint(last)
    with pytest.raises(CorruptCheckpointError, match="incomplete or corrupt"):
        AtomicCheckpointIO().load_checkpoint(last)

    trainer = tiny_trainer(3, [callback()])
    trainer.fit(tiny_module(), datamodule=tiny_data(train), ckpt_path="last")
    assert Path(trainer.ckpt_path).name == "epoch=0-step=2.ckpt"  # the same step as the broken last.ckpt
    assert "is incomplete or corrupt: skipped" in caplog.text
    assert trainer.global_step == 3 and is_complete_checkpoint(last)


# ------------------------------------------------------------------ unwritable folder, no space
def test_unwritable_runs_dir_fails_before_training(tmp_path: Path, make_shards, emo_args, capsys) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")  # as root chmod does not stop writes; a path under a file always fails
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *emo_args(blocker / "runs", make_shards(5), "--trainer.max_steps", "2")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"emo: checkpoint directory {blocker / 'runs' / 'emo_tiny'} cannot be created" in err


def test_unwritable_checkpoint_dir_fails_before_the_first_step(tmp_path: Path, make_shards, tiny) -> None:
    tiny_module, tiny_data, tiny_trainer = tiny
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    trainer = tiny_trainer(2, [SafeModelCheckpoint(dirpath=blocker / "ckpts", save_last=True)])
    with pytest.raises(CheckpointDirError, match="cannot be created"):
        trainer.fit(tiny_module(), datamodule=tiny_data(make_shards(5)))
    assert trainer.global_step == 0


def test_file_size_limit_below_a_checkpoint_fails_at_start_up(tmp_path: Path, make_shards, tiny) -> None:
    tiny_module, tiny_data, tiny_trainer = tiny
    trainer = tiny_trainer(2, [SafeModelCheckpoint(dirpath=tmp_path / "ckpts", save_last=True)])
    with file_size_limit(200_000), pytest.raises(CheckpointDirError, match=r"file-size limit \(ulimit -f\)"):
        trainer.fit(tiny_module(), datamodule=tiny_data(make_shards(5)))
    assert trainer.global_step == 0 and not list((tmp_path / "ckpts").iterdir())


class ShrinkDiskAt(L.Callback):
    """From step ``step`` on, only 200 kB can be written (the disk filled up under the run)."""

    def __init__(self, step: int, stack: contextlib.ExitStack) -> None:
        self.step, self.stack = step, stack

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self.stack.enter_context(file_size_limit(200_000))


def test_space_running_out_fails_at_save_time_keeping_the_previous_checkpoint(
    tmp_path: Path, make_shards, tiny
) -> None:
    tiny_module, tiny_data, tiny_trainer = tiny
    ckpts = tmp_path / "ckpts"
    with contextlib.ExitStack() as stack:
        callbacks = [
            ShrinkDiskAt(2, stack),
            SafeModelCheckpoint(dirpath=ckpts, save_last=True, every_n_train_steps=1),
        ]
        trainer = tiny_trainer(4, callbacks)
        with pytest.raises(
            CheckpointWriteError, match=r"needs about .* MiB but only 0\.2 MiB can be written"
        ):
            trainer.fit(tiny_module(), datamodule=tiny_data(make_shards(5)))
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == 1
    assert not list(ckpts.glob(".*"))


def test_write_failing_half_way_removes_the_temporary_and_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    atomic_save({"version": 1}, path)
    many_small = {f"t{i}": torch.zeros(1) for i in range(3000)}  # 12 kB of tensors, ~500 kB of archive
    assert tensor_bytes(many_small) < 20_000
    with (
        file_size_limit(20_000),
        pytest.raises(CheckpointWriteError, match=r"File too large.*partial file was removed"),
    ):
        atomic_save(many_small, path)  # the free-space check passes, the write itself fails (EFBIG)
    assert torch.load(path, weights_only=True) == {"version": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


# ------------------------------------------------------------------ other model config
def test_checkpoint_of_another_expert_count_names_the_keys(
    tmp_path: Path, make_shards, emo_args, capsys
) -> None:
    train = make_shards(10)
    main(["fit", *emo_args(tmp_path, train, "--trainer.max_steps", "1")])
    other = [
        "--model.router.num_experts",
        "4",
        "--model.router.pool_max",
        "3",
        "--model.router.pool_eval",
        "3",
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *emo_args(tmp_path, train, *other, "--trainer.max_steps", "2", "--ckpt_path", "last")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("emo: the checkpoint does not fit this model configuration") and err.count("\n") == 1
    )
    assert "shape mismatch: model.blocks.0.moe.router.weight: checkpoint (7, 32) vs model (3, 32)" in err
    assert "router.num_experts: checkpoint 8, current 4" in err
    assert "Traceback" not in err
