"""DeepSpeed ZeRO-2 + expert parallelism on 2 and 4 real CPU processes (gloo); no mocks of distributed behaviour.

Launches ``ep_equivalence_worker.py`` under ``torchrun`` (4 processes ep 2; 2 processes ep 1), ``memory_worker.py``
(2 processes, ~1.2 GB of routed experts) and Lightning runs of ``lightning_worker.py`` (4 processes ep 2;
Lightning starts the other processes itself). TORCH_EXTENSIONS_DIR caches DeepSpeed's JIT comm op.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import lightning as L
import pytest
import torch

from emo_lightning.checkpoint.deepspeed import consolidate
from emo_lightning.model import EMOTransformer, param_counts
from emo_lightning.parallel import EMODeepSpeedStrategy, validate_expert_parallel

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
pytestmark = pytest.mark.distributed
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
WORLD = 4  # the Lightning runs: 4 processes, ep_size 2
STARTUP = re.compile(
    r"rank (\d)/4: ([\d,]+) parameters \(dense ([\d,]+), shared ([\d,]+), routed ([\d,]+): (\d) of 7 experts"
)


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
    """4 processes, ep 2: 4 steps straight (checkpoint every step), then a resume from step 2 in another folder."""
    root = tmp_path_factory.mktemp("ds_ep")
    straight, resumed = root / "straight", root / "resumed"
    proc = _worker(straight, tiny_shards, "--max-steps", "4")
    (root / "straight.log").write_text(proc.stdout + proc.stderr)
    _worker(resumed, tiny_shards, "--max-steps", "4", "--ckpt", str(straight / "ckpt" / "s2.ckpt"))
    return {"straight": straight, "resumed": resumed, "root": root}


# ------------------------------------------------------------------ equivalence with one process (torchrun)
def _equivalence(tmp_path: Path, world: int, ep_size: int) -> dict:
    out = tmp_path / "eq.json"
    _run([*TORCHRUN, str(world), str(HERE / "ep_equivalence_worker.py"), str(out), str(ep_size)])
    return json.loads(out.read_text())


def _check_equivalence(report: dict, modes: tuple[str, ...]) -> None:
    """Every difference is the maximum over all ranks (NaN = infinite): each rank's experts, gradients, weights,
    bias and usage, not rank 0's alone."""
    worst = report["max"]
    assert len(report["ranks"]) == report["world"]
    for balance in ("aux_loss", "both"):
        b = f"{balance}/"
        assert worst[b + "construction/weights"] == 0.0, worst  # bit-identical to the one-process build
        assert worst[b + "construction/counts_wrong"] == 0.0, worst
        assert worst[b + "usage"] < 1e-5, worst
        for mode in modes:
            for step in (0, 1):
                key = f"{b}{mode}/step{step}"
                assert worst[f"{key}/loss"] < 1e-5, (key, worst)
                assert worst[f"{key}/grad"] < 1e-6, (key, worst)
                assert worst[f"{key}/grad_norm"] < 1e-5, (key, worst)
                assert worst[f"{key}/weights"] < 5e-5, (key, worst)
                if balance == "both":  # every rank holds the one-process bias, step after step
                    assert worst[f"{key}/bias"] < 1e-6, (key, worst)
        assert b + "variable/step0/bias" in worst or balance == "aux_loss"


def test_ep2_on_4_processes_matches_one_process(tmp_path: Path) -> None:
    """4 processes, ep_size 2 (two expert-data-parallel replicas), ZeRO-2, EMO router with the balance loss and
    with loss + selection bias, both exchange modes: rank-local construction gives the one-process weights; the
    synced expert-usage metric, the loss, DeepSpeed's reduced gradients of every rank's experts and the gradient
    norm, the bias and the weights after two clipped AdamW steps equal one process on the same global batch, on
    every rank."""
    report = _equivalence(tmp_path, 4, 2)
    _check_equivalence(report, ("variable", "padded"))
    held = [r["aux_loss/construction/local_experts"] for r in report["ranks"]]
    assert held == [4, 3, 4, 3]  # EP ranks 0 hold experts 0-3, EP ranks 1 experts 4-6 (+ the shared slot)


def test_ep1_on_2_processes_matches_one_process(tmp_path: Path) -> None:
    """2 processes, ep_size 1 (experts replicated, reduced over the expert-data-parallel group = the world)."""
    report = _equivalence(tmp_path, 2, 1)
    _check_equivalence(report, ("variable",))
    assert [r["aux_loss/construction/local_experts"] for r in report["ranks"]] == [7, 7]


def test_rank_local_construction_holds_only_its_experts(tmp_path: Path) -> None:
    """ep 2 on 2 processes with ~1.2 GB of routed experts: each rank's resident memory grows by what it holds,
    about half of the model, also at its peak during construction; loading a one-file checkpoint (memory-mapped)
    reads only the local experts."""
    sys.path.insert(0, str(HERE))
    from memory_worker import CFG

    counts = param_counts(CFG)
    full_bytes, routed_bytes = 4 * counts.total, 4 * counts.routed_experts
    assert routed_bytes >= 1e9
    with torch.device("meta"):
        full = EMOTransformer(CFG)
    # a one-file checkpoint of the whole model; torch.empty's pages are never touched: no resident copy here
    state = {f"model.{k}": torch.empty(v.shape) for k, v in full.state_dict().items()}
    ckpt = tmp_path / "consolidated.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": {"arch": asdict(CFG.arch)}}, ckpt)
    del state
    _run([*TORCHRUN, "2", str(HERE / "memory_worker.py"), str(tmp_path), str(ckpt)])
    for rank in (0, 1):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["finite"], r
        local = r["model_bytes"]
        assert 0.4 * full_bytes < local < 0.6 * full_bytes, (local, full_bytes)
        for key in ("construction_growth", "construction_peak_growth", "load_peak_growth"):
            # what the rank holds plus allocator slack (init temporaries): about half, never the whole model
            assert 0.8 * local < r[key] < 0.75 * full_bytes, (key, r, full_bytes)


# ------------------------------------------------------------------ Lightning, 4 processes, ep 2
def test_zero2_ep2_trains_with_finite_decreasing_loss(runs: dict[str, Path]) -> None:
    for rank in range(WORLD):
        losses = [
            v for _, v in sorted((int(k), v) for k, v in _result(runs["straight"], rank)["losses"].items())
        ]
        assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
        assert losses[-1] < losses[0] - 0.1, losses
    ckpt = runs["straight"] / "ckpt" / "s4.ckpt" / "checkpoint"
    files = list(ckpt.glob("layer_*_expert_*_model_states.pt"))
    assert len(files) == 2 * 8  # one file per (layer, expert slot), written by expert-data-parallel rank 0


def test_every_rank_logs_its_placement(runs: dict[str, Path]) -> None:
    """``rank r/4: P parameters (dense D, shared S, routed R: X of 7 experts per layer), B MB`` once per rank;
    P = D + S + R, R = X experts of 2 layers; EP ranks 0 hold experts 0-3, EP ranks 1 experts 4-6 + the shared
    slot."""
    lines = {int(m[1]): m for m in STARTUP.finditer((runs["root"] / "straight.log").read_text())}
    assert sorted(lines) == [0, 1, 2, 3], lines
    one_expert = 3 * 32 * 32
    for rank, m in lines.items():
        total, dense, shared, routed = (int(m[i].replace(",", "")) for i in range(2, 6))
        held = int(m[6])
        assert held == (4 if rank % 2 == 0 else 3)
        assert total == dense + shared + routed and routed == 2 * held * one_expert
        assert shared == 2 * one_expert


def test_resume_continues_exactly(runs: dict[str, Path]) -> None:
    """Resume at step 2 (same ep_size): same losses at steps 3-4 on every rank and the same final weights."""
    for rank in range(WORLD):
        a, b = _result(runs["straight"], rank)["losses"], _result(runs["resumed"], rank)["losses"]
        assert sorted(b) == ["3", "4"]
        for step in ("3", "4"):
            assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-6)
    ref = consolidate(runs["straight"] / "ckpt" / "s4.ckpt", runs["root"] / "a.ckpt")
    got = consolidate(runs["resumed"] / "ckpt" / "s4.ckpt", runs["root"] / "b.ckpt")
    ref_sd = torch.load(ref, weights_only=False)["state_dict"]
    got_sd = torch.load(got, weights_only=False)["state_dict"]
    assert ref_sd.keys() == got_sd.keys()
    for name, tensor in ref_sd.items():
        if isinstance(tensor, torch.Tensor):
            torch.testing.assert_close(got_sd[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_consolidated_checkpoint_validates_in_one_process(runs: dict[str, Path], tiny_shards) -> None:
    """The consolidated export loads with EMOLitModule.load_from_checkpoint and gives the validation loss that
    the 4-process expert-parallel model gave on the same data."""
    sys.path.insert(0, str(HERE))
    from lightning_worker import data

    from emo_lightning.lit_module import EMOLitModule

    path = consolidate(runs["straight"] / "ckpt" / "s4.ckpt", runs["root"] / "single.ckpt")
    module = EMOLitModule.load_from_checkpoint(path)
    assert module.model.blocks[0].moe.experts.w_in.shape[0] == 7  # all routable experts in one process
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, limit_val_batches=4
    )
    dm = data(str(tiny_shards["train"]), str(tiny_shards["val"]), rank=0, world_size=1)
    val = trainer.validate(module, datamodule=dm, verbose=False)[0]["val/ce"]
    assert val == pytest.approx(_result(runs["straight"])["val_ce"], rel=1e-5)


def test_init_from_loads_every_tensor_and_buffer_then_the_bias_moves_once_per_step(
    tmp_path: Path, tiny_shards: dict[str, Path]
) -> None:
    """``--init_from`` under the strategy (4 processes, ep 2) with a trained one-process checkpoint whose routers
    carry a selection bias: every rank's parameters and buffers equal the checkpoint (its experts: their slice of
    the global ids), the bias included; then two optimizer steps of two accumulated micro-batches move the bias
    exactly once per optimizer step (DeepSpeed steps every micro-batch), identically on every rank."""
    sys.path.insert(0, str(HERE))
    from lightning_worker import data

    from tests.factories import tiny_lit_module

    L.seed_everything(0)
    module = tiny_lit_module(lr=1e-2, warmup_steps=1, balance="both", bias_gamma=0.05)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    trainer.fit(module, datamodule=data(str(tiny_shards["train"]), None))
    ckpt = tmp_path / "trained.ckpt"
    trainer.save_checkpoint(ckpt)
    trained_bias = torch.stack([r.expert_bias for r in module.model.routers()])
    assert (trained_bias.abs() > 0).any()  # three steps moved it: a missing buffer would show
    out = tmp_path / "run"
    _worker(
        out,
        tiny_shards,
        "--init-from",
        str(ckpt),
        "--balance",
        "both",
        "--accumulate",
        "2",
        "--max-steps",
        "2",
    )
    results = [_result(out, rank) for rank in range(WORLD)]
    for rank, r in enumerate(results):
        init = r["init"]
        assert init["max_diff"] == 0.0, (rank, init)
        assert sorted(init["buffers"]) == [
            "blocks.0.moe.router.expert_bias",
            "blocks.1.moe.router.expert_bias",
        ]
        assert init["tensors"] == init["parameters"] + 2
        assert r["global_step"] == 2 and r["bias_updates"] == 2, (
            r
        )  # once per optimizer step, not per micro-batch
        assert all(math.isfinite(v) for v in r["losses"].values())
    for step in ("1", "2"):  # every rank holds the same bias after every step
        assert all(r["bias"][step] == results[0]["bias"][step] for r in results)
    assert results[0]["bias"]["1"] != results[0]["bias"]["2"] != trained_bias.tolist()


def test_bad_ep_size_fails_before_building(tmp_path: Path, tiny_shards) -> None:
    """ep_size 4 on 2 processes: refused on every rank before any weight exists (no startup line)."""
    proc = _worker(
        tmp_path / "bad", tiny_shards, "--devices", "2", "--ep-size", "4", "--max-steps", "2", check=False
    )
    assert proc.returncode != 0
    assert "trainer.strategy.init_args.ep_size=4 must divide the data-parallel world size 2" in proc.stderr
    assert " parameters (dense " not in proc.stdout + proc.stderr  # nothing was built
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
