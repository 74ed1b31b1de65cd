"""Experiment presets: a ``conf/`` YAML composed by ``emo fit``'s own parser into typed configs, nothing built.

``load_preset("conf/experiment/emo_tiny.yaml", ["--model.router.pool_scope", "running"])`` reads the file the
way ``emo fit --config`` does (``config:`` includes, dotted keys, files relative to the including file,
``--model.* / --data.* / --trainer.*`` overrides, every value validated) and returns the model, optimizer,
data and trainer sections. Benchmarks, the GPU check, the scale probe and ``emo estimate`` use it instead of
reading YAML themselves.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emo_lightning.model import ArchConfig, ModelConfig, RouterConfig
from emo_lightning.optim import OptimConfig


def compose(config: str | Path, overrides: Sequence[str] = ()) -> Any:
    """The experiment's composed configuration (a jsonargparse namespace; ``emo fit``'s parser)."""
    from emo_lightning.cli import EMOCLI  # the CLI's parser: Lightning and the data module classes
    from emo_lightning.data import ShardDataModule
    from emo_lightning.lit_module import EMOLitModule

    class _ParseOnly(EMOCLI):
        def instantiate_classes(self) -> None:  # no trainer, no model, no data module
            pass

        def _set_seed(self) -> None:
            pass

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "args and sys.argv both given": args is what we mean
        cli = _ParseOnly(
            EMOLitModule,
            ShardDataModule,
            run=False,
            args=["--config", str(config), *overrides],
            parser_kwargs={"default_env": True},
        )
    return cli.config


def _section(ns: Any) -> dict[str, Any]:
    """A namespace section as a plain dict (nested namespaces too)."""
    out = {}
    for key, value in vars(ns).items():
        if key.startswith("__"):
            continue
        out[key] = _section(value) if hasattr(value, "__dict__") and not isinstance(value, type) else value
    return out


@dataclass
class Preset:
    """A composed experiment: typed model and optimizer configs, the data and trainer sections as dicts."""

    path: str
    experiment: str
    model: ModelConfig
    optim: OptimConfig
    data: dict[str, Any]
    trainer: dict[str, Any]


def model_config(ns: Any) -> ModelConfig:
    """The typed ``ModelConfig`` of a composed configuration."""
    return ModelConfig(
        arch=ArchConfig(**_section(ns.model.arch)), router=RouterConfig(**_section(ns.model.router))
    )


def load_preset(config: str | Path, overrides: Sequence[str] = ()) -> Preset:
    """Compose ``config`` with ``overrides`` (command-line style, e.g. ``["--model.optim.lr", "6e-3"]``)."""
    ns = compose(config, overrides)
    optim = _section(ns.model.optim)
    optim["betas"] = tuple(optim["betas"])
    return Preset(
        path=str(config),
        experiment=ns.experiment,
        model=model_config(ns),
        optim=OptimConfig(**optim),
        data=_section(ns.data),
        trainer=_section(ns.trainer),
    )
