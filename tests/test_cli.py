"""The `emo` command line: composed configs, overrides, interpolation, clear config errors, run folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from emo_lightning.cli import build_cli, main

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
    with pytest.raises(SystemExit) as exit_info:
        validate("--model.arch.d_model=16")
    assert exit_info.value.code == 1
    assert "arch.d_model: checkpoint 32, current 16" in capsys.readouterr().err


def test_config_error_names_the_key(tmp_path: Path, tiny_shards, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *small_run_args(tmp_path, tiny_shards, "--model.router.pool_min", "1")])
    assert exit_info.value.code == 2
    assert "router.pool_min" in capsys.readouterr().err


def test_unknown_key_is_rejected(tmp_path: Path, tiny_shards, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["fit", *small_run_args(tmp_path, tiny_shards, "--model.router.pool_minimum", "4")])
    assert "pool_minimum" in capsys.readouterr().err


CPU_OVERRIDES = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1",
                 "--trainer.strategy", "auto", "--trainer.precision", "32-true"]  # fmt: skip


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "conf" / "experiment").glob("*.yaml")))
def test_every_experiment_file_parses(name: str) -> None:
    """Each shipped experiment composes into valid, instantiable objects (the model is built lazily, in
    ``configure_model``, so even the 14B config costs nothing here; GPU/cluster presets are pointed at the CPU)."""
    from emo_lightning.cli import EMOCLI
    from emo_lightning.data import ShardDataModule
    from emo_lightning.lit_module import EMOLitModule

    cli = EMOCLI(
        EMOLitModule, ShardDataModule, run=False, args=["--config", str(ROOT / "conf" / "experiment" / name), *CPU_OVERRIDES],
        parser_kwargs={"parser_mode": "omegaconf+"},
    )  # fmt: skip
    assert cli.config.experiment == name.removesuffix(".yaml")
    assert cli.model.config.router.kind == ("standard" if name.startswith("stdmoe") else "emo")


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
