"""DeepSpeed ZeRO-2 + expert parallelism on 2 real CPU processes (gloo); no mocks of distributed behaviour.

Launches: one ``torchrun`` run of ``ep_equivalence_worker.py`` and three Lightning runs of ``lightning_worker.py``
(Lightning starts the second process itself). TORCH_EXTENSIONS_DIR caches DeepSpeed's JIT comm op.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from emo_lightning.parallel import EMODeepSpeedStrategy, validate_expert_parallel
from emo_lightning.parallel.checkpoint import consolidate

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
pytestmark = pytest.mark.distributed


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    env["OMP_NUM_THREADS"] = "1"
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK"):
        env.pop(key, None)
    return env


def _run(args: list[str], check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def _worker(
    out: Path, shards: dict[str, Path], *extra: str, check: bool = True
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(HERE / "lightning_worker.py"),
        str(out),
        str(shards["train"]),
        str(shards["val"]),
    ]
    return _run([*cmd, *extra], check=check)


def _result(out: Path, rank: int = 0) -> dict:
    return json.loads((out / f"rank{rank}.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_shards: dict[str, Path]) -> dict[str, Path]:
    """5 steps straight (checkpoint every step), then a resume from step 3 to step 5 in another folder."""
    root = tmp_path_factory.mktemp("ds_ep")
    straight, resumed = root / "straight", root / "resumed"
    _worker(straight, tiny_shards, "--max-steps", "5")
    _worker(resumed, tiny_shards, "--max-steps", "5", "--ckpt", str(straight / "ckpt" / "s3.ckpt"))
    return {"straight": straight, "resumed": resumed, "root": root}


def test_ep2_matches_one_process_loss_grads_and_zero2_step(tmp_path: Path) -> None:
    """ep_size=2 over 2 ranks == 1 process on the same global batch (EMO router, both exchange modes): loss,
    reduced gradients, and the weights after one ZeRO-2 step of DeepSpeed's engine."""
    out = tmp_path / "eq.json"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _run([*torchrun, str(HERE / "ep_equivalence_worker.py"), str(out)])
    report = json.loads(out.read_text())
    for exchange in ("variable", "padded"):
        assert report[f"{exchange}/loss"] < 1e-5, report
        assert report[f"{exchange}/grad"] < 1e-6, report
        assert report[f"{exchange}/zero2_step_weights"] < 1e-5, report


def test_zero2_ep2_trains_with_finite_decreasing_loss(runs: dict[str, Path]) -> None:
    for rank in (0, 1):
        losses = [
            v for _, v in sorted((int(k), v) for k, v in _result(runs["straight"], rank)["losses"].items())
        ]
        assert len(losses) == 5 and all(torch.isfinite(torch.tensor(losses)))
        assert losses[-1] < losses[0] - 0.1, losses
    ckpt = runs["straight"] / "ckpt" / "s5.ckpt" / "checkpoint"
    assert (
        len(list(ckpt.glob("layer_*_expert_*_model_states.pt"))) == 2 * 8
    )  # one file per (layer, expert slot)


def test_resume_continues_exactly(runs: dict[str, Path]) -> None:
    """Resume at step 3 (same ep_size): same losses at steps 4-5 and the same final weights on every rank."""
    for rank in (0, 1):
        a, b = _result(runs["straight"], rank)["losses"], _result(runs["resumed"], rank)["losses"]
        assert sorted(b) == ["4", "5"]
        for step in ("4", "5"):
            assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-6)
    ref = consolidate(runs["straight"] / "ckpt" / "s5.ckpt", runs["root"] / "a.ckpt")
    got = consolidate(runs["resumed"] / "ckpt" / "s5.ckpt", runs["root"] / "b.ckpt")
    ref_sd = torch.load(ref, weights_only=False)["state_dict"]
    got_sd = torch.load(got, weights_only=False)["state_dict"]
    assert ref_sd.keys() == got_sd.keys()
    for name, tensor in ref_sd.items():
        if isinstance(tensor, torch.Tensor):
            torch.testing.assert_close(got_sd[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_consolidated_checkpoint_validates_in_one_process(runs: dict[str, Path], tiny_shards) -> None:
    """The consolidated export loads with EMOLitModule.load_from_checkpoint and gives the validation loss that
    the 2-process expert-parallel model gave on the same data."""
    sys.path.insert(0, str(HERE))
    from lightning_worker import data

    from emo_lightning.lit_module import EMOLitModule

    path = consolidate(runs["straight"] / "ckpt" / "s5.ckpt", runs["root"] / "single.ckpt")
    module = EMOLitModule.load_from_checkpoint(path)
    assert module.model.blocks[0].moe.experts.w_in.shape[0] == 7  # all routable experts in one process
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, limit_val_batches=4
    )
    dm = data(str(tiny_shards["train"]), str(tiny_shards["val"]), rank=0, world_size=1)
    val = trainer.validate(module, datamodule=dm, verbose=False)[0]["val/ce"]
    assert val == pytest.approx(_result(runs["straight"])["val_ce"], rel=1e-5)


def test_bad_ep_size_fails_before_training(tmp_path: Path, tiny_shards) -> None:
    proc = _worker(tmp_path / "bad", tiny_shards, "--ep-size", "4", "--max-steps", "2", check=False)
    assert proc.returncode != 0
    assert "trainer.strategy.init_args.ep_size=4 must divide the data-parallel world size 2" in proc.stderr
    assert not (tmp_path / "bad" / "ckpt").exists()  # nothing trained, nothing saved


def test_placement_validation_messages() -> None:
    validate_expert_parallel(2, 4, 16, 1)
    with pytest.raises(ValueError, match=r"ep_size=3 must divide model.router.num_experts=16"):
        validate_expert_parallel(3, 6, 16, 1)
    with pytest.raises(ValueError, match=r"ep_size=4 must divide the data-parallel world size 2"):
        validate_expert_parallel(4, 2, 16, 1)
    with pytest.raises(ValueError, match=r"hold no routable expert"):
        validate_expert_parallel(8, 8, 8, 1)
    with pytest.raises(ValueError, match=r"stage=3 is not supported with expert parallelism"):
        EMODeepSpeedStrategy(ep_size=2, stage=3)
