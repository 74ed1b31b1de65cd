"""``emo``: the LightningCLI entry point (``emo fit --config conf/experiment/emo_tiny.yaml``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from emo_lightning.callbacks.nonfinite import NonFiniteGuard, NonFiniteLossError
from emo_lightning.callbacks.preemption import PreemptionCheckpoint
from emo_lightning.callbacks.safe_checkpoint import SafeModelCheckpoint
from emo_lightning.checkpointing import (
    CheckpointDirError,
    CheckpointMismatchError,
    CheckpointWriteError,
    CorruptCheckpointError,
    preflight_checkpoint_dir,
)
from emo_lightning.data import ShardDataModule
from emo_lightning.data.dataset import ShardFailureError
from emo_lightning.lit_module import EMOLitModule


def checkpoint_dir(runs_dir: str, experiment: str) -> str:
    """Where the checkpoints of an experiment live (fixed, so that ``--ckpt_path last`` finds them)."""
    return str(Path(runs_dir) / experiment / "checkpoints")


class EMOCLI(LightningCLI):
    """LightningCLI with an experiment name that places TensorBoard logs and checkpoints in ``runs/<name>/``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--experiment", type=str, default="emo_tiny", help="Run name: runs/<experiment>/")
        parser.add_argument("--runs_dir", type=str, default="runs", help="Parent folder of all runs.")
        parser.add_lightning_class_args(SafeModelCheckpoint, "checkpoint")
        # Robustness (README "Operations"): preemption signals and non-finite steps, on in every run.
        parser.add_lightning_class_args(PreemptionCheckpoint, "preemption")
        parser.add_lightning_class_args(NonFiniteGuard, "nonfinite")
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "checkpoint.every_n_train_steps": 200,
                "checkpoint.save_top_k": 1,
                "checkpoint.filename": "step{step:07d}",
                "checkpoint.auto_insert_metric_name": False,
                # one last.ckpt per run: a resume (also after a preemption save) overwrites it atomically
                "checkpoint.enable_version_counter": False,
            }
        )
        parser.link_arguments(("runs_dir", "experiment"), "checkpoint.dirpath", compute_fn=checkpoint_dir)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        argv = sys.argv[1:] if args is None else args  # LightningCLI also accepts a dict or Namespace
        self._argv = [a for a in argv if isinstance(a, str)] if isinstance(argv, list) else []
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """Checkpoint hyper-parameters replace the configured model, except explicit ``--model.*`` arguments.

        Lightning rebuilds the model from ``ckpt_path``'s hyper-parameters, also over command-line arguments, so
        ``emo validate --ckpt_path X --model.router.pool_eval 8`` would silently validate with the saved value
        (Lightning-AI/pytorch-lightning#21455). Config files still yield to the checkpoint (a resumed run trains
        what it trained); explicit ``--model.*`` arguments are re-applied on top (an architecture change then fails
        with ``CheckpointMismatchError`` naming the keys).
        """
        explicit = {a[2:].split("=", 1)[0] for a in self._argv if a.startswith("--model.")}
        before = self.config.clone()
        super()._parse_ckpt_path()
        subcommand = self.config.get("subcommand")
        for key in explicit:
            if f"{subcommand}.{key}" in before:
                self.config[f"{subcommand}.{key}"] = before[f"{subcommand}.{key}"]

    def instantiate_trainer(self, **kwargs: Any):
        config = self.config[self.subcommand] if self.subcommand else self.config
        logger = config.trainer.get("logger")
        if logger is None or logger is True:
            # TensorBoard by default, one folder per experiment (runs/<experiment>/), hyper-parameters included.
            kwargs["logger"] = TensorBoardLogger(
                save_dir=config.runs_dir, name=config.experiment, version="", default_hp_metric=False
            )
        if config.trainer.get("default_root_dir") is None:
            # Also without a logger, everything a run writes (e.g. config.yaml) stays in runs/<experiment>/.
            kwargs["default_root_dir"] = str(Path(config.runs_dir) / config.experiment)
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        """Fail before training if the run folder or the checkpoint folder cannot be written."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        try:
            for folder in (Path(config.runs_dir) / config.experiment, config.checkpoint.dirpath):
                if folder is not None:
                    preflight_checkpoint_dir(folder)
        except CheckpointDirError as err:
            print(f"emo: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except _CLEAN_ERRORS as err:
            # Operational faults with a message that says it all (README "Operations"): no traceback.
            print(f"emo: {type(err).__name__}: {err}", file=sys.stderr)
            raise SystemExit(1) from None

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as err:
            # Config dataclasses validate themselves and name the offending key; show that, not a traceback.
            print(f"emo: configuration error: {err}", file=sys.stderr)
            raise SystemExit(2) from None


_CLEAN_ERRORS = (
    CheckpointDirError,
    CheckpointMismatchError,
    CheckpointWriteError,
    CorruptCheckpointError,
    NonFiniteLossError,
    ShardFailureError,
)


def build_cli(args: list[str] | None = None) -> EMOCLI:
    """Parse ``args`` (default: the command line) and run the subcommand; returns the CLI (model, trainer)."""
    return EMOCLI(
        EMOLitModule,
        ShardDataModule,
        parser_kwargs={"parser_mode": "omegaconf+", "default_env": True},
        save_config_kwargs={"overwrite": True},
        seed_everything_default=1234,
        args=args,
    )


def main(args: list[str] | None = None) -> None:
    """Run ``emo {fit,validate,test,predict}``."""
    build_cli(args)


if __name__ == "__main__":
    main()
