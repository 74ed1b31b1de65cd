"""``emo``: the LightningCLI entry point (``emo fit --config conf/experiment/emo_tiny.yaml``).

Every run gets the expert-usage, throughput and learning-rate monitors (``--monitor false`` turns them off),
checkpoints in ``runs/<experiment>/checkpoints``, the preemption handler and the non-finite-loss guard, whatever
the trainer preset or ``--trainer.callbacks``. Mistakes on the command line end with one line (``emo: ...``,
exit 2; ``EMO_DEBUG=1`` or ``--debug`` for the traceback): see :mod:`emo_lightning.errors`.
"""

from __future__ import annotations

import difflib
import re
import sys
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentError
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from emo_lightning.callbacks import DomainTokenMonitor, ExpertUsageMonitor, TokenThroughputMonitor
from emo_lightning.callbacks.nonfinite import NonFiniteGuard, NonFiniteLossError
from emo_lightning.callbacks.preemption import PreemptionCheckpoint
from emo_lightning.callbacks.safe_checkpoint import SafeModelCheckpoint
from emo_lightning.checkpoint import (
    CheckpointWriteError,
    CorruptCheckpointError,
    is_complete_checkpoint,
    preflight_checkpoint_dir,
    read_checkpoint,
)
from emo_lightning.data import ShardDataModule
from emo_lightning.data.dataset import ShardFailureError
from emo_lightning.errors import UserError, run_cli
from emo_lightning.lit_module import EMOLitModule

# Lightning's special ``ckpt_path`` values (resolved by the trainer, not paths)
_CKPT_KEYWORDS = ("last", "best", "hpc", "registry")
# Operational faults during a run: one line with the fault's name, exit 1 (README "Operations").
_FAULTS = (CheckpointWriteError, NonFiniteLossError, ShardFailureError)


def checkpoint_dir(runs_dir: str, experiment: str) -> str:
    """Where the checkpoints of an experiment live (fixed, so that ``--ckpt_path last`` finds them)."""
    return str(Path(runs_dir) / experiment / "checkpoints")


class EMOArgumentParser(LightningArgumentParser):
    """OmegaConf interpolation in configs (``${.d_model}``); raises ``ArgumentError`` instead of printing usage
    and exiting: ``EMOCLI`` turns it into one line."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["exit_on_error"] = False
        kwargs.setdefault("parser_mode", "omegaconf+")
        super().__init__(*args, **kwargs)


def explain_parse_error(message: str, options: list[str]) -> UserError:
    """One-line user error from a jsonargparse message (unknown key, wrong type, invalid value)."""
    unknown = re.search(r"[Uu]nrecognized arguments: (--\S+)", message)
    if unknown:
        key = unknown.group(1).split("=", 1)[0]
        close = difflib.get_close_matches(key, options, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        return UserError(f"unknown option {key}", f"{hint}`emo fit --help` lists every option")
    not_expected = (
        re.search(r"Key '([^']+)' is not expected", message)
        or re.search(r"[Oo]ption '([^']+)' is not accepted", message)
        or re.search(r"does not accept option '([^']+)'", message)
    )
    if not_expected:
        key = not_expected.group(1)
        close = difflib.get_close_matches(key, [o.lstrip("-") for o in options], n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        return UserError(f"unknown config key {key!r}", f"{hint}`emo fit --help` lists every key")
    # our own validation (ConfigError) travels inside jsonargparse's message: show only that line
    ours = re.search(r"((?:model\.)?(?:arch|router|optim)\.[a-z_]+: [^\n]+)", message)
    if ours:
        return UserError(ours.group(1).strip())
    missing = re.search(r"File does not exist: '([^']+)'", message)
    if missing:
        return UserError(
            f"--config {missing.group(1)}: no such file",
            "pass a YAML file, e.g. conf/experiment/emo_tiny.yaml",
        )
    key = re.search(r'Parser key "([^"]+)":\s*(.*)', message, re.S)
    if key:
        return UserError(f"{key.group(1)}: {_expected(key.group(2))}")
    return UserError(" ".join(message.split()))


def _expected(detail: str) -> str:
    """'must be <type>, got <value>' from jsonargparse's type-check message (Union and Literal noise removed)."""
    got = re.search(r"(?:Given value|Got value): (.*?)\s*$", detail, re.S)
    value = got.group(1).strip() if got else "?"
    literal = re.search(r"Literal\[(.*?)\]", detail)
    if literal:
        return f"must be one of {literal.group(1)}, got {value!r}"
    types = [t for t in re.findall(r"Expected a (?:<class ')?([\w.]+)", detail) if t != "NoneType"]
    nullable = " (or null)" if "NoneType" in detail else ""
    return f"must be {' or '.join(dict.fromkeys(types)) or 'valid'}{nullable}, got {value!r}"


class EMOCLI(LightningCLI):
    """LightningCLI with an experiment name that places TensorBoard logs and checkpoints in ``runs/<name>/``."""

    def __init__(
        self, *args: Any, parser_class: type[LightningArgumentParser] = EMOArgumentParser, **kwargs: Any
    ):
        super().__init__(*args, parser_class=parser_class, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--experiment", type=str, default="emo_tiny", help="Run name: runs/<experiment>/")
        parser.add_argument("--runs_dir", type=str, default="runs", help="Parent folder of all runs.")
        parser.add_argument(
            "--init_from",
            type=str | None,
            default=None,
            help="Fine-tune: start from this checkpoint's weights, architecture and router (trained, pruned or "
            "consolidated), with a fresh optimizer, schedule and data; --ckpt_path resumes a run instead.",
        )
        parser.link_arguments("init_from", "model.init_from")
        parser.add_argument(
            "--monitor",
            type=bool,
            default=True,
            help="Attach the expert-usage, throughput and learning-rate monitors (TensorBoard; needs a logger).",
        )
        parser.add_class_arguments(ExpertUsageMonitor, "expert_usage")
        parser.add_class_arguments(TokenThroughputMonitor, "throughput")
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

    # ------------------------------------------------------------------ parsing
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        argv = sys.argv[1:] if args is None else args  # LightningCLI also accepts a dict or Namespace
        self._argv = [a for a in argv if isinstance(a, str)] if isinstance(argv, list) else []
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            raise self._explain(err) from None

    def _explain(self, err: ArgumentError) -> UserError:
        subcommand = next((a for a in self._argv if a in self.subcommands()), None)
        parser = self._subcommand_parsers.get(subcommand) if subcommand else None
        options = [o for a in (parser or self.parser)._actions for o in a.option_strings]
        return explain_parse_error(str(err), options)

    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path``; checkpoint hyper-parameters replace the configured model, except explicit
        ``--model.*`` arguments.

        Lightning rebuilds the model from ``ckpt_path``'s hyper-parameters, also over command-line arguments, so
        ``emo validate --ckpt_path X --model.router.pool_eval 8`` would silently validate with the saved value
        (Lightning-AI/pytorch-lightning#21455). Config files still yield to the checkpoint (a resumed run trains
        what it trained); explicit ``--model.*`` arguments are re-applied on top (an architecture change then fails
        with ``CheckpointMismatchError`` naming the keys).
        """
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        check_ckpt_path(self.config[subcommand].get("ckpt_path"))
        explicit = {a[2:].split("=", 1)[0] for a in self._argv if a.startswith("--model.")}
        before = self.config.clone()
        try:
            self._apply_init_from(subcommand)
            super()._parse_ckpt_path()
        except ArgumentError as err:
            raise self._explain(err) from None
        for key in explicit:
            if f"{subcommand}.{key}" in before:
                self.config[f"{subcommand}.{key}"] = before[f"{subcommand}.{key}"]

    def _apply_init_from(self, subcommand: str) -> None:
        """``--init_from CKPT``: the model's architecture and router come from the checkpoint (a pruned one is
        smaller); the optimizer, schedule and data stay as configured."""
        path = self.config[subcommand].get("init_from")
        if not path:
            return
        # recorded absolute (hparams): `emo-experts merge` finds a fine-tuned part's source from any folder
        path = self.config[subcommand]["init_from"] = str(Path(path).absolute())
        hparams = read_checkpoint(path)["hyper_parameters"]
        model = {
            k: asdict(v) if is_dataclass(v) else dict(v) for k in ("arch", "router") if (v := hparams.get(k))
        }
        self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ArgumentError as err:
            raise self._explain(err) from None

    # ------------------------------------------------------------------ trainer
    def _run_config(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    def instantiate_trainer(self, **kwargs: Any):
        config = self._run_config()
        logger = config.trainer.get("logger")
        if logger is None or logger is True:
            # TensorBoard by default, one folder per experiment (runs/<experiment>/), hyper-parameters included.
            kwargs["logger"] = TensorBoardLogger(
                save_dir=config.runs_dir, name=config.experiment, version="", default_hp_metric=False
            )
        if config.trainer.get("default_root_dir") is None:
            # Also without a logger, everything a run writes (e.g. config.yaml) stays in runs/<experiment>/.
            kwargs["default_root_dir"] = str(Path(config.runs_dir) / config.experiment)
        init = self.config_init[self.subcommand] if self.subcommand else self.config_init
        user = list(init.trainer.get("callbacks") or [])
        has_logger = logger is not False
        kwargs["callbacks"] = [*user, *self._monitors(init, user)] if config.monitor and has_logger else user
        return super().instantiate_trainer(**kwargs)

    @staticmethod
    def _monitors(init: Any, user: list[Callback]) -> list[Callback]:
        """The monitors every run gets (a kind the user already passed in ``trainer.callbacks`` is not doubled)."""
        ours = [
            init.expert_usage,
            init.throughput,
            LearningRateMonitor(logging_interval="step"),
            DomainTokenMonitor(),
        ]
        return [m for m in ours if not any(isinstance(c, type(m)) for c in user)]

    def before_fit(self) -> None:
        """Fail before training if the run folder or the checkpoint folder cannot be written."""
        config = self._run_config()
        for folder in (Path(config.runs_dir) / config.experiment, config.checkpoint.dirpath):
            if folder is not None:
                preflight_checkpoint_dir(folder)


def check_ckpt_path(ckpt_path: str | None) -> None:
    """A ``--ckpt_path`` that is not one of Lightning's keywords must be a readable, complete checkpoint."""
    if not ckpt_path or ckpt_path in _CKPT_KEYWORDS or "://" in ckpt_path:
        return
    path = Path(ckpt_path)
    if not path.exists():
        raise CorruptCheckpointError(
            f"ckpt_path {path}: no such checkpoint",
            "pass a .ckpt written by `emo fit` (or `--ckpt_path last`)",
        )
    if not is_complete_checkpoint(path, check_crc=False):
        raise CorruptCheckpointError(
            f"ckpt_path {path}: not a checkpoint (or truncated)", "pass a .ckpt written by `emo fit`"
        )


def build_cli(args: list[str] | None = None) -> EMOCLI:
    """Parse ``args`` (default: the command line) and run the subcommand; returns the CLI (model, trainer)."""
    return EMOCLI(
        EMOLitModule,
        ShardDataModule,
        parser_kwargs={"default_env": True},
        save_config_kwargs={"overwrite": True},
        seed_everything_default=1234,
        args=args,
    )


def main(args: list[str] | None = None) -> None:
    """Run ``emo {fit,validate,test,predict}`` (LightningCLI), ``emo generate`` or ``emo estimate`` (user errors:
    one line, exit 2)."""

    def run(argv: list[str]) -> None:
        if argv and argv[0] == "generate":
            from emo_lightning.generate import main as generate

            generate(argv[1:])
        elif argv and argv[0] == "estimate":
            from emo_lightning.estimate import main as estimate

            estimate(argv[1:])
        elif args is None:  # LightningCLI reads the command line itself: hand it the one without --debug
            sys.argv[1:] = argv
            build_cli(None)
        else:
            build_cli(argv)

    run_cli("emo", run, args, faults=_FAULTS)  # operational faults (README "Operations"): one line, exit 1


if __name__ == "__main__":
    main()
