"""The `emo` command line: composed configs, overrides, interpolation, clear config errors, run folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import Namespace

from emo_lightning.checkpoint import CheckpointMismatchError
from emo_lightning.cli import EMOCLI, build_cli, main
from emo_lightning.data import ShardDataModule
from emo_lightning.errors import ConfigError
from emo_lightning.lit_module import EMOLitModule

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = str(ROOT / "conf" / "experiment" / "emo_tiny.yaml")


def small_run_args(tmp_path: Path, shards: dict[str, Path], *extra: str) -> list[str]:
    return [
        "--config", EXPERIMENT,
        "--runs_dir", str(tmp_path),
        "--data.train_shards", str(shards["train"]),
        "--data.val_shards", str(shards["val"]),
        "--data.seq_len", "64",
        "--data.batch_size", "4",
        "--data.num_workers", "0",
        "--model.arch.d_model", "32",
        "--model.arch.n_layers", "2",
        "--model.arch.n_heads", "2",
        "--trainer.max_steps", "3",
        "--trainer.val_check_interval", "3",
        "--trainer.limit_val_batches", "2",
        "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false",
        *extra,
    ]  # fmt: skip


def test_fit_writes_tensorboard_config_and_checkpoint(tmp_path: Path, tiny_shards) -> None:
    main(["fit", *small_run_args(tmp_path, tiny_shards, "--model.router.pool_min", "3")])
    run = tmp_path / "emo_tiny"
    assert (run / "checkpoints" / "last.ckpt").exists()
    assert list(run.glob("events.out.tfevents.*"))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["router"]["pool_min"] == 3  # the override reached the model
    # interpolation in conf/arch/tiny.yaml: expert_hidden follows the overridden d_model
    assert saved["model"]["arch"]["d_model"] == 32 and saved["model"]["arch"]["expert_hidden"] == 32
    # resume from "last" continues the same run folder
    main(["fit", *small_run_args(tmp_path, tiny_shards, "--trainer.max_steps", "4", "--ckpt_path", "last")])
    assert sorted(p.name for p in (run / "checkpoints").glob("last*")) == [
        "last.ckpt"
    ]  # overwritten, not versioned
    # the final step is saved although 4 is not a multiple of checkpoint.every_n_train_steps (200)
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 4
    assert sorted(p.name for p in (run / "checkpoints").glob("step*")) == ["step0000004.ckpt"]


def test_explicit_model_arguments_win_over_checkpoint_hyperparameters(
    tmp_path: Path, tiny_shards, capsys
) -> None:
    main(["fit", *small_run_args(tmp_path, tiny_shards, "--model.router.pool_min", "3")])
    ckpt = str(tmp_path / "emo_tiny" / "checkpoints" / "last.ckpt")

    def validate(*extra: str):
        return build_cli(["validate", *small_run_args(tmp_path, tiny_shards), "--ckpt_path", ckpt, *extra])

    saved = validate()
    assert saved.model.config.router.pool_min == 3  # the checkpoint's value, not the config file's
    assert saved.model.config.router.pool_eval == 4
    changed = validate("--model.router.pool_eval=2")
    assert changed.model.config.router.pool_eval == 2  # an explicit argument is not silently dropped
    assert changed.model.config.router.pool_min == 3
    # an explicit architecture change is applied too, and then refused with the keys named
    with pytest.raises(CheckpointMismatchError, match=r"arch\.d_model: checkpoint 32, current 16"):
        validate("--model.arch.d_model=16")


def user_error(capsys: pytest.CaptureFixture[str], args: list[str]) -> str:
    """Run ``emo`` with ``args``: it must exit 2 and end with one ``emo: ...`` line (no traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    last = err.rstrip("\n").splitlines()[-1]
    assert last.startswith("emo: "), err
    return last


@pytest.mark.parametrize(
    ("extra", "line"),
    [
        (
            ["--model.router.pool_min", "1"],
            "emo: router.pool_min: must be >= routed experts per token k'=top_k-num_shared=2, got pool_min=1 "
            "(top-k would pick experts outside the pool)",
        ),
        (["--model.optim.lr", "0"], "emo: optim.lr: must be > 0, got 0.0"),
        (["--data.seq_len", "0"], "emo: data.seq_len: must be >= 1, got 0"),
        (
            ["--model.router.kind", "topk"],
            "emo: model.router.kind: must be one of 'emo', 'standard', got 'topk'",
        ),
        (["--model.arch.d_model", "wide"], "emo: model.arch.d_model: must be int, got 'wide'"),
        (
            ["--model.router.pool_minimum", "4"],
            "emo: unknown option --model.router.pool_minimum: did you mean --model.router.pool_min? "
            "`emo fit --help` lists every option",
        ),
    ],
)
def test_config_mistakes_end_in_one_line(
    tmp_path: Path, tiny_shards, capsys, extra: list[str], line: str
) -> None:
    assert user_error(capsys, ["fit", *small_run_args(tmp_path, tiny_shards, *extra)]) == line


def test_unknown_key_in_a_config_file(tmp_path: Path, tiny_shards, capsys) -> None:
    extra = tmp_path / "typo.yaml"
    extra.write_text("model.router.pool_minn: 3\n")
    args = ["fit", *small_run_args(tmp_path, tiny_shards), "--config", str(extra)]
    assert user_error(capsys, args) == (
        "emo: unknown config key 'model.router.pool_minn': did you mean model.router.pool_min? "
        "`emo fit --help` lists every key"
    )


def test_data_and_checkpoint_mistakes_end_in_one_line(tmp_path: Path, tiny_shards, capsys) -> None:
    missing = tmp_path / "nowhere"
    assert user_error(
        capsys, ["fit", *small_run_args(tmp_path, tiny_shards, "--data.train_shards", str(missing))]
    ) == (
        f"emo: data.train_shards: {missing}: no such shard folder: build them with `make data` (the bundled "
        "corpus) or `emo-data build-shards --input FILES --out DIR`"
    )
    (tmp_path / "empty").mkdir()
    args = small_run_args(tmp_path, tiny_shards, "--data.train_shards", str(tmp_path / "empty"))
    assert user_error(capsys, ["fit", *args]) == (
        f"emo: {tmp_path / 'empty' / 'manifest.json'}: no shard manifest: rebuild the shards with "
        "`emo-data build-shards` (or `make data`)"
    )
    assert user_error(
        capsys, ["fit", *small_run_args(tmp_path, tiny_shards, "--model.arch.vocab_size", "100")]
    ) == (
        "emo: model.arch.vocab_size=100 is smaller than the tokenizer's vocabulary (4096 ids, from the data "
        "manifest): set --model.arch.vocab_size 4096"
    )
    assert user_error(capsys, ["fit", *small_run_args(tmp_path, tiny_shards, "--data.seq_len", "512")]) == (
        "emo: data.seq_len=512 exceeds model.arch.max_seq_len=256: set --data.seq_len 256 or "
        "--model.arch.max_seq_len 512"
    )
    ckpt = tmp_path / "missing.ckpt"
    assert user_error(
        capsys, ["validate", *small_run_args(tmp_path, tiny_shards), "--ckpt_path", str(ckpt)]
    ) == (
        f"emo: ckpt_path {ckpt}: no such checkpoint: pass a .ckpt written by `emo fit` (or `--ckpt_path last`)"
    )
    ckpt.write_text("not a checkpoint")
    assert user_error(
        capsys, ["validate", *small_run_args(tmp_path, tiny_shards), "--ckpt_path", str(ckpt)]
    ) == (f"emo: ckpt_path {ckpt}: not a checkpoint (or truncated): pass a .ckpt written by `emo fit`")


@pytest.mark.parametrize("how", ["env", "flag"])
def test_debug_shows_the_traceback_of_a_user_error(
    tmp_path: Path, tiny_shards, monkeypatch, how: str
) -> None:
    args = ["fit", *small_run_args(tmp_path, tiny_shards, "--model.router.pool_min", "1")]
    if how == "env":
        monkeypatch.setenv("EMO_DEBUG", "1")
    else:
        args.append("--debug")
    with pytest.raises(ConfigError, match=r"router\.pool_min"):
        main(args)


CPU_OVERRIDES = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1",
                 "--trainer.precision", "32-true"]  # fmt: skip
CONFIGS = sorted(
    p.relative_to(ROOT).as_posix()
    for p in (ROOT / "conf").glob("*/*.yaml")
    if p.parent.name in ("experiment", "studies")
)


@pytest.mark.parametrize("path", CONFIGS)
def test_every_experiment_builds_its_model_and_strategy(path: str) -> None:
    """Each shipped experiment composes into its objects: the trainer with the strategy class it names (on one
    CPU process, not launched) and the model, built on the meta device (the 14B one too: shapes, no memory);
    its parameter count is what the config says."""
    cli = EMOCLI(EMOLitModule, ShardDataModule, run=False, args=["--config", path, *CPU_OVERRIDES])
    name = Path(path).stem
    assert cli.config.experiment == name
    cfg = cli.model.config
    assert cfg.router.kind == ("standard" if name.startswith("stdmoe") else "emo")
    strategy = cli.config.trainer.strategy
    if isinstance(strategy, Namespace):  # a class named in the YAML is instantiated by the trainer
        assert type(cli.trainer.strategy).__name__ == strategy.class_path.rsplit(".", 1)[-1]
    with torch.device("meta"):
        cli.model.configure_model()
    a, r = cfg.arch, cfg.router
    kv = a.kv_heads * a.head_dim
    attention = a.d_model * (2 * a.d_model + 2 * kv)
    experts = r.num_experts * 3 * a.d_model * a.expert_hidden + r.num_routed * a.d_model  # + router
    dense = 2 * a.vocab_size * a.d_model + a.d_model * (2 * a.n_layers + 1)  # embed, lm_head, norms
    expected = dense + a.n_layers * (attention + experts)
    assert sum(p.numel() for p in cli.model.parameters()) == expected


def test_run_without_logger_writes_nothing_outside_the_run_folder(
    tmp_path: Path, tiny_shards, monkeypatch
) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    main(
        [
            "fit",
            *small_run_args(
                tmp_path / "runs",
                tiny_shards,
                "--trainer.logger",
                "false",
                "--trainer.callbacks",
                "[]",
                "--trainer.max_steps",
                "1",
            ),
        ]
    )
    assert list(cwd.iterdir()) == []
    assert (tmp_path / "runs" / "emo_tiny" / "config.yaml").exists()


def _callbacks(*args: str) -> list[str]:
    cli = EMOCLI(EMOLitModule, ShardDataModule, run=False, args=["--config", EXPERIMENT, *args])
    return [type(c).__name__ for c in cli.trainer.callbacks]


MONITORS = ["ExpertUsageMonitor", "TokenThroughputMonitor", "LearningRateMonitor"]


def test_every_run_has_the_monitors_unless_turned_off() -> None:
    for args in (
        [],
        ["--trainer.callbacks", "[]"],
        ["--trainer", str(ROOT / "conf" / "trainer" / "deepspeed_cpu.yaml")],
    ):
        names = _callbacks(*args, *CPU_OVERRIDES)
        assert all(names.count(m) == 1 for m in MONITORS), (args, names)
    assert not set(MONITORS) & set(_callbacks("--monitor", "false"))
    assert not set(MONITORS) & set(_callbacks("--trainer.logger", "false"))  # nothing to show them in
    # a monitor the user configures in trainer.callbacks replaces ours (no duplicate)
    own = '[{"class_path": "emo_lightning.callbacks.ExpertUsageMonitor", "init_args": {"log_every_n_steps": 7}}]'
    cli = EMOCLI(
        EMOLitModule, ShardDataModule, run=False, args=["--config", EXPERIMENT, "--trainer.callbacks", own]
    )
    usage = [c for c in cli.trainer.callbacks if type(c).__name__ == "ExpertUsageMonitor"]
    assert [m.log_every_n_steps for m in usage] == [7]
    # ours is configurable from the command line
    cli = EMOCLI(
        EMOLitModule,
        ShardDataModule,
        run=False,
        args=["--config", EXPERIMENT, "--expert_usage.log_every_n_steps", "5"],
    )
    assert [
        c.log_every_n_steps for c in cli.trainer.callbacks if type(c).__name__ == "ExpertUsageMonitor"
    ] == [5]


def test_init_from_a_pruned_checkpoint_fine_tunes_the_pruned_model(
    tmp_path: Path, tiny_shards, monkeypatch
) -> None:
    """``--init_from`` takes weights and the (smaller) architecture from the checkpoint, with a fresh optimizer
    and step count; the loss falls; a relative path is recorded absolute (merge reads it from anywhere)."""
    from emo_lightning.experts.cli import main as experts

    main(["fit", *small_run_args(tmp_path, tiny_shards, "--trainer.max_steps", "4")])
    full = str(tmp_path / "emo_tiny" / "checkpoints" / "last.ckpt")
    subset, small = str(tmp_path / "subset.json"), str(tmp_path / "small.ckpt")
    experts(["select", "--ckpt", full, "--data", "x", "--method", "random", "--keep", "4", "--out", subset])
    experts(["prune", "--ckpt", full, "--subset", subset, "--out", small, "--no-progress"])

    def val_ce(*args: str) -> float:
        cli = build_cli(["validate", *small_run_args(tmp_path, tiny_shards), *args])
        return float(cli.trainer.callback_metrics["val/ce"])

    before = val_ce("--init_from", small)
    assert before == val_ce("--ckpt_path", small)  # the pruned weights were loaded, not a fresh init
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["fit", *small_run_args(tmp_path, tiny_shards, "--trainer.max_steps", "12", "--trainer.val_check_interval", "12", "--init_from", "small.ckpt", "--experiment", "ft")])  # fmt: skip
    assert cli.model.hparams["init_from"] == small
    model = cli.model.model
    assert model.cfg.router.num_experts == 4  # the pruned architecture (3 routable + 1 shared)
    pruned = torch.load(small, map_location="cpu", weights_only=True)["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for v in pruned.values())
    assert cli.trainer.global_step == 12  # a fresh run: counted from 0, not from the source's step 4
    assert float(cli.trainer.callback_metrics["val/ce"]) < before


def test_fit_on_a_shard_folder_without_documents_is_refused(tmp_path: Path, tiny_shards, capsys) -> None:
    from data_tools.cli import main as emo_data

    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(SystemExit):  # refused too, and leaves a manifest of nothing behind
        emo_data(["build-shards", "--input", str(tmp_path / "empty.jsonl"), "--tokenizer",
                  str(ROOT / "data" / "tokenizer.json"), "--out", str(tmp_path / "shards")])  # fmt: skip
    capsys.readouterr()
    args = small_run_args(tmp_path, tiny_shards, "--data.train_shards", str(tmp_path / "shards"))
    assert user_error(capsys, ["fit", *args]).startswith(f"emo: data.train_shards: no shards in '{tmp_path}")
