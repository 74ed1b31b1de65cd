"""``EMODeepSpeedStrategy``: Lightning's DeepSpeedStrategy with expert parallelism, on GPUs and on CPU/gloo.

What it adds to ``lightning.pytorch.strategies.DeepSpeedStrategy``:

* CPU support (so the distributed path is tested for real): on a CPU accelerator it skips Lightning's CUDA
  check in ``setup_environment`` and the GPU-index validation in ``setup_distributed`` and reports
  ``torch.device("cpu", local_rank)`` as root device; DeepSpeed then picks its CPU accelerator and gloo.
* Expert parallelism: validates ``ep_size`` before any weight exists (it must divide the data-parallel world and
  ``router.num_experts``), creates DeepSpeed's expert-parallel / expert-data-parallel groups
  (``deepspeed.utils.groups``) and builds the rank's model (:meth:`EMODeepSpeedStrategy.build_model`, called by
  ``EMOLitModule.configure_model``): on the meta device, placed, then materialised with only this rank's
  experts (:func:`~emo_lightning.parallel.expert_parallel.build_expert_parallel_model`); ``init_from`` reads
  only the local experts of a one-file checkpoint. The optimizer groups are split into DeepSpeed's MoE groups by
  ``emo_lightning.optim.build_optimizer``.
* Global load balance: the module's ``GlobalLoadBalance.group`` is DeepSpeed's data-parallel group (every
  rank: together they see every token of the global batch). Expert-parallel groups would be wrong: a rank's
  EP group sees only its slice of the data-parallel world, so counts summed there miss the other EP groups'
  tokens.
* ``train_micro_batch_size_per_gpu`` from ``datamodule.batch_size`` (the loader has ``batch_size=None``).
* ZeRO-3 is refused with a clear message: DeepSpeed 0.19 asserts "Native DeepSpeed MoE is not supported with
  ZeRO Stage 3" (its only ZeRO-3 MoE path, AutoEP, replaces the router with its own token-choice gate).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from torchmetrics import Metric

from emo_lightning.checkpoint.deepspeed import load_local_weights
from emo_lightning.errors import ConfigError
from emo_lightning.model import EMOTransformer, ModelConfig
from emo_lightning.parallel.expert_parallel import (
    Exchange,
    apply_expert_parallel,
    build_expert_parallel_model,
    expert_parallel_rank,
    validate_expert_parallel,
)

ZERO3_MESSAGE = (
    "trainer.strategy.init_args.stage=3 is not supported with expert parallelism: DeepSpeed 0.19 refuses ZeRO-3 "
    "for native MoE layers ('Native DeepSpeed MoE is not supported with ZeRO Stage 3. Use AutoEP or choose ZeRO "
    "stage 1/2'), and AutoEP swaps the EMO document-pool router for its own token-choice gate. Use stage 1 or 2 "
    "(stage 2 also shards gradients; experts are already sharded ep_size-ways by expert parallelism)."
)


class EMODeepSpeedStrategy(DeepSpeedStrategy):
    """DeepSpeed ZeRO-1/2 + expert parallelism for :class:`~emo_lightning.lit_module.EMOLitModule`.

    Args:
        ep_size: expert-parallel size (ranks sharing one layer's experts); divides the world size and
            ``router.num_experts``. 1 = experts replicated (pure data parallelism).
        stage: ZeRO stage, 0, 1 or 2 (3 is refused, see ``ZERO3_MESSAGE``).
        exchange: token exchange, ``"variable"`` (exact-size all-to-all) or ``"padded"`` (equal splits, capacity =
            global max count; DeepSpeed's ``_AllToAll``).
        micro_batch_size: ``train_micro_batch_size_per_gpu``; default: the datamodule's ``batch_size``.
        **kwargs: forwarded to ``DeepSpeedStrategy`` (bucket sizes, offload, config, ...).
    """

    strategy_name = "emo_deepspeed"

    def __init__(
        self,
        ep_size: int = 1,
        stage: int = 2,
        exchange: Exchange = "variable",
        micro_batch_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        if stage == 3:
            raise ConfigError(ZERO3_MESSAGE)
        if stage not in (0, 1, 2):
            raise ConfigError("trainer.strategy.init_args.stage", f"must be 0, 1 or 2, got {stage}")
        if ep_size < 1:
            raise ConfigError("trainer.strategy.init_args.ep_size", f"must be >= 1, got {ep_size}")
        if exchange not in ("variable", "padded"):
            raise ConfigError(
                "trainer.strategy.init_args.exchange", f"must be variable|padded, got {exchange!r}"
            )
        super().__init__(stage=stage, **kwargs)
        self.ep_size, self.exchange, self.micro_batch_size = ep_size, exchange, micro_batch_size

    # ------------------------------------------------------------------ CPU support
    @property
    def _on_cpu(self) -> bool:
        return isinstance(self.accelerator, CPUAccelerator)

    @property
    def root_device(self) -> torch.device:
        if self._on_cpu:
            return torch.device("cpu", self.local_rank)
        return super().root_device

    def setup_environment(self) -> None:
        if self._on_cpu:
            DDPStrategy.setup_environment(self)  # skips DeepSpeedStrategy's CUDA-only check
        else:
            super().setup_environment()

    def setup_distributed(self) -> None:
        if not self._on_cpu:
            super().setup_distributed()
            return
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()  # no GPU-index validation on CPU

    # ------------------------------------------------------------------ config and model
    def _set_micro_batch(self) -> None:
        """DeepSpeed needs train_micro_batch_size_per_gpu; Lightning's guess fails for batch_size=None loaders."""
        if self.config is None or "train_micro_batch_size_per_gpu" in self.config:
            return
        size = self.micro_batch_size
        if size is None and self.lightning_module is not None and self.lightning_module._trainer is not None:
            size = getattr(self.lightning_module.trainer.datamodule, "batch_size", None)
        self.config["train_micro_batch_size_per_gpu"] = int(size or 1)

    def validate_placement(self, config: ModelConfig | None = None) -> None:
        """ep_size against the world and the model's experts (raises ``ConfigError`` naming the key)."""
        config = config if config is not None else getattr(self.lightning_module, "config", None)
        router = getattr(config, "router", None)
        if router is None:
            raise ValueError("EMODeepSpeedStrategy needs an EMOLitModule (model.config.router)")
        validate_expert_parallel(self.ep_size, self.world_size, router.num_experts, router.num_shared)

    def build_model(self, config: ModelConfig, init_from: str | None = None) -> EMOTransformer:
        """This rank's transformer: placement checked first, then built on the meta device, placed and
        materialised on the current default device (Lightning's root device) with only this rank's experts;
        ``init_from`` (a one-file checkpoint) is read for the local experts only. Collective (groups)."""
        self.validate_placement(config)
        ep_rank = expert_parallel_rank(self.ep_size)
        model = build_expert_parallel_model(config, self.ep_size, self.exchange, ep_rank=ep_rank)
        if init_from:
            load_local_weights(model, init_from)
        return model

    def model_sharded_context(self):  # type: ignore[override]
        self.validate_placement()  # before the model is built: fail fast, on every rank alike
        self._set_micro_batch()
        return super().model_sharded_context()

    def setup(self, trainer: pl.Trainer) -> None:
        self.validate_placement()
        self._set_micro_batch()
        module = self.lightning_module
        # normally placed already (build_model); a model built elsewhere (e.g. load_from_checkpoint) is placed
        # now, its other ranks' experts dropped
        apply_expert_parallel(module.model, self.ep_size, None, self.exchange)
        from deepspeed.utils import groups

        if hasattr(module, "balance"):
            # Counts over the data-parallel group: all ranks together see every token of the global batch.
            module.balance.group = groups._get_data_parallel_group()
        dtypes = _metric_state_dtypes(module)
        super().setup(trainer)  # DeepSpeedPrecision casts the whole module for "*-true" precisions...
        _restore_metric_state_dtypes(module, dtypes)  # ...including float64 metric states: undo that


def _metric_state_dtypes(module: torch.nn.Module) -> dict[tuple[str, str], torch.dtype]:
    out = {}
    for name, m in module.named_modules():
        if isinstance(m, Metric):
            for key, value in m._defaults.items():
                if isinstance(value, torch.Tensor):
                    out[(name, key)] = value.dtype
    return out


def _restore_metric_state_dtypes(module: torch.nn.Module, dtypes: dict[tuple[str, str], torch.dtype]) -> None:
    mods = dict(module.named_modules())
    for (name, key), dtype in dtypes.items():
        m = mods[name]
        if m._defaults[key].dtype != dtype:
            m._defaults[key] = m._defaults[key].to(dtype)
            setattr(m, key, getattr(m, key).to(dtype))
