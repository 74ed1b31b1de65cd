"""The LightningModule: loss = cross-entropy + weighted auxiliary losses, optimizer, schedule, global balance.

It knows the model (``emo_lightning.model``) and the batch contract of ``docs/architecture.md``; it knows
nothing of file formats or shards.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
import torch
import torch.distributed as dist

from emo_lightning.checkpoint import CheckpointMismatchError, describe_mismatch, load_weights
from emo_lightning.errors import UserError
from emo_lightning.metrics import DomainLoss, TokenPerplexity
from emo_lightning.model import (
    IGNORE_INDEX,
    ArchConfig,
    EMOTransformer,
    GlobalLoadBalance,
    LayerRouting,
    ModelConfig,
    ModelOutput,
    RouterConfig,
    derive_seed,
    flops_per_token,
    objective,
    token_cross_entropy,
)
from emo_lightning.optim import OptimConfig, build_optimizer

# Lightning shows its own INFO lines on every rank; the startup line joins them (same handler, same settings).
startup_log = logging.getLogger("lightning.pytorch.emo_lightning")


class EMOLitModule(L.LightningModule):
    """Pretrains an :class:`EMOTransformer` (EMO document-pool router or the standard-MoE baseline).

    Args:
        arch: transformer shape (``--model.arch.d_model 256``).
        router: experts and routing (``--model.router.kind standard``, ``--model.router.pool_min 4``).
        optim: AdamW and schedule (``--model.optim.lr 1e-3``).
        init_from: start from the weights of this checkpoint (trained, pruned or consolidated), with a fresh
            optimizer and schedule: fine-tuning, unlike ``ckpt_path`` which resumes a run. ``emo fit
            --init_from CKPT`` also takes the architecture and router from the checkpoint.
    """

    def __init__(
        self,
        arch: ArchConfig = ArchConfig(),
        router: RouterConfig = RouterConfig(),
        optim: OptimConfig = OptimConfig(),
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.config = ModelConfig(arch=arch, router=router)
        self.optim_config = optim
        self.init_from = init_from
        self.model: EMOTransformer | None = (
            None  # built in configure_model (directly on the device / sharded)
        )
        self.balance = GlobalLoadBalance.for_model(self.config)
        self._step_started = -1
        self.train_ppl = TokenPerplexity()
        self.val_ppl = TokenPerplexity()
        self.domains: list[str] = []
        self.val_domain_loss: DomainLoss | None = None
        # Set by monitoring callbacks (ExpertUsageMonitor): training steps then keep their per-token routes.
        self.collect_routes = False
        self.last_routing: list[LayerRouting] | None = None  # routing of the last training micro-batch
        # Robustness (NonFiniteGuard): the last micro-batch's loss terms, and a skipped step's scheduler flag.
        self.loss_terms: dict[str, torch.Tensor] = {}
        self.skip_lr_scheduler_step = False
        self.stream_skips = {"skipped_shards": 0, "skipped_docs": 0}  # data-stream faults (batch extra keys)

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        """Check the model against the data (vocabulary, sequence length) and size the per-domain metric."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None:
            vocab = getattr(datamodule, "vocab_size", None)
            if vocab is not None and vocab > self.config.arch.vocab_size:
                raise UserError(
                    f"model.arch.vocab_size={self.config.arch.vocab_size} is smaller than the tokenizer's "
                    f"vocabulary ({vocab} ids, from the data manifest)",
                    f"set --model.arch.vocab_size {vocab}",
                )
            seq_len = getattr(datamodule, "seq_len", None)
            if seq_len is not None and seq_len > self.config.arch.max_seq_len:
                raise UserError(
                    f"data.seq_len={seq_len} exceeds model.arch.max_seq_len={self.config.arch.max_seq_len}",
                    f"set --data.seq_len {self.config.arch.max_seq_len} or --model.arch.max_seq_len {seq_len}",
                )
            self.domains = list(getattr(datamodule, "domains", []) or [])
        if self.domains and self.val_domain_loss is None:
            self.val_domain_loss = DomainLoss(len(self.domains))
        if dist.is_available() and dist.is_initialized():
            # Expert counts are summed over every rank: all data-parallel ranks together see all tokens.
            self.balance.group = dist.group.WORLD

    def configure_model(self) -> None:
        """Build the transformer (idempotent) and load ``init_from``'s weights. Lightning calls this under the
        strategy's init context (its device). A strategy with ``build_model(config, init_from)``
        (``EMODeepSpeedStrategy``) builds the rank's own part (expert parallelism: only its experts). Every rank
        then logs its startup line (``rank r/W: P parameters (dense D, shared S, routed ...), B MB``)."""
        if self.model is not None:
            return
        build = getattr(self._trainer.strategy, "build_model", None) if self._trainer is not None else None
        if build is not None:
            self.model = build(self.config, self.init_from)
        else:
            self.model = EMOTransformer(self.config)
            if self.init_from and not self.model.lm_head.weight.is_meta:
                load_weights(self.model, self.init_from)
        if not self.model.lm_head.weight.is_meta:
            rank, world = (self.global_rank, self.trainer.world_size) if self._trainer is not None else (0, 1)
            startup_log.info(self.model.parameter_summary().line(rank, world))

    @property
    def flops_per_batch(self) -> float | None:
        """Training FLOPs (forward + backward) of one micro-batch, for Lightning's ThroughputMonitor."""
        return getattr(self, "_flops_per_batch", None)

    # ------------------------------------------------------------------ steps
    def forward(
        self,
        batch: dict[str, torch.Tensor],
        balance: GlobalLoadBalance | None = None,
        return_routes: bool = False,
    ) -> ModelOutput:
        return self.model(
            batch["input_ids"],
            batch["doc_ids"],
            balance=balance,
            return_routes=return_routes,
            route_probs=False,
        )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.trainer.global_step != self._step_started:
            self._start_optimizer_step(self.trainer.global_step)
        if self.flops_per_batch is None:
            rows, seq = batch["input_ids"].shape
            self._flops_per_batch = flops_per_token(self.config, seq) * rows * seq  # training FLOPs
        out = self(batch, balance=self.balance, return_routes=self.collect_routes)
        self.last_routing = out.layers if self.collect_routes else None
        loss, ce, n_targets = objective(out.logits, batch["labels"], out.aux_loss)
        self.loss_terms = {"CE": ce.detach(), "LB": out.lb_loss.detach(), "z-loss": out.z_loss.detach()}
        if out.lm_z_loss is not None:
            self.loss_terms["LM z-loss"] = out.lm_z_loss.detach()
        self._log_stream_skips(batch)
        self.log_dict(
            {
                "train/loss": loss.detach(),
                "train/ce": ce.detach(),
                "train/lb": _mean_layer_stat(out, "lb"),
                "train/z": _mean_layer_stat(out, "z"),
            },
            on_step=True,
            prog_bar=False,
        )
        self.train_ppl(ce.detach(), n_targets)  # forward: this micro-batch's value, for on_step logging
        self.log("train/ppl", self.train_ppl, on_step=True, on_epoch=False, prog_bar=True)
        self.log("loss", ce.detach(), prog_bar=True, logger=False)
        return loss

    def _log_stream_skips(self, batch: dict[str, torch.Tensor]) -> None:
        """Count the data-stream faults reported through the batch's optional extra keys (see data/README)."""
        for key in self.stream_skips:
            if key in batch:
                self.stream_skips[key] += int(batch[key].sum())
        if any(self.stream_skips.values()):
            self.log_dict({f"data/{k}": float(v) for k, v in self.stream_skips.items()}, on_step=True)

    def _start_optimizer_step(self, step: int) -> None:
        """First micro-batch of an optimizer step: reset the step's expert counts and reseed the pool sizes.

        Pool sizes are drawn from (router.seed, rank, step): they differ between data-parallel ranks, and a
        resumed run draws exactly what the uninterrupted run drew (the one resume mechanism: nothing is saved).
        """
        self.balance.reset()
        self.model.reseed_routers(derive_seed(self.config.router.seed, self.global_rank, step))
        self._step_started = step

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self(batch)  # local balance statistics only: no collectives in validation
        labels = batch["labels"].flatten()
        token_loss = token_cross_entropy(out.logits, batch["labels"])
        valid = labels != IGNORE_INDEX
        n_targets = valid.sum()
        ce = token_loss.sum() / n_targets.clamp_min(1)
        self.val_ppl.update(ce, n_targets)
        if self.val_domain_loss is not None:
            domains = batch["domain_ids"].flatten()
            keep = valid & (domains >= 0)
            self.val_domain_loss.update(token_loss[keep], domains[keep])
        self.log("val/ce", ce, on_epoch=True, sync_dist=True, batch_size=int(n_targets))
        self.log("val/ppl", self.val_ppl, on_epoch=True)
        self.log("val/lb", _mean_layer_stat(out, "lb"), on_epoch=True, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        if self.val_domain_loss is None:
            return
        losses, tokens = self.val_domain_loss.compute()
        self.val_domain_loss.reset()
        for name, value, count in zip(self.domains, losses.tolist(), tokens.tolist(), strict=True):
            if count > 0:
                self.log(f"val/{name}/loss", value, sync_dist=False)
                self.log(f"val/{name}/ppl", math.exp(min(value, 50.0)), sync_dist=False)

    # -------------------------------------------------------------- checkpoints
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another model shape with the mismatching keys named (not a tensor traceback)."""
        saved = checkpoint.get("state_dict")
        if not saved or self.model is None:
            return
        problems = describe_mismatch(saved, self.state_dict())
        if problems:
            hparams = checkpoint.get("hyper_parameters", {})
            diffs = [
                f"{section}.{k}: checkpoint {v!r}, current {getattr(cur, k, None)!r}"
                for section, cur in (("arch", self.config.arch), ("router", self.config.router))
                if (old := hparams.get(section)) is not None
                for k, v in (vars(old) if hasattr(old, "__dict__") else dict(old)).items()
                if getattr(cur, k, None) != v
            ]
            raise CheckpointMismatchError(
                "the checkpoint does not fit this model configuration ("
                + "; ".join(problems)
                + ("; configuration differences: " + "; ".join(diffs) if diffs else "")
                + ")",
                "resume with the checkpoint's model settings, or start a new run (another --experiment)",
            )

    # -------------------------------------------------------------- optimizer
    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """Auxiliary-loss-free balancing (``router.balance`` bias or both): move every router's bias from the
        expert counts of the whole optimizer step (all micro-batches and ranks), once per step and before the
        weights change, so a checkpoint of step t holds step t's bias (resume is exact). A step skipped by
        ``NonFiniteGuard`` leaves the bias alone."""
        if not self.config.router.uses_bias or self.balance.counts is None or self.skip_lr_scheduler_step:
            return
        engine = getattr(self.trainer.strategy, "deepspeed_engine", None)  # DeepSpeed steps every micro-batch
        if engine is not None and not engine.is_gradient_accumulation_boundary():
            return
        self.model.update_expert_bias(self.balance.counts)
        # (L,) max - min of each layer's bias
        spread = torch.stack([r.expert_bias.max() - r.expert_bias.min() for r in self.model.routers()])
        self.log_dict({f"usage/bias_spread/layer{i}": v for i, v in enumerate(spread)}, on_step=True)
        self.log("usage/bias_spread", spread.mean(), on_step=True)

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        """Step the schedule, except after an optimizer step skipped by ``NonFiniteGuard``."""
        if self.skip_lr_scheduler_step:
            self.skip_lr_scheduler_step = False
            return
        super().lr_scheduler_step(scheduler, metric)

    def configure_optimizers(self) -> dict[str, Any]:
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else None
        if total is None and self.optim_config.decay_steps is None:
            raise UserError(
                "trainer.max_steps is not set",
                "set it or model.optim.decay_steps (the cosine schedule's length)",
            )
        optimizer, scheduler = build_optimizer(self.model, self.optim_config, total or 0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _mean_layer_stat(out: ModelOutput, name: str) -> torch.Tensor:
    """Mean over layers of an unweighted per-layer auxiliary value (``lb`` or ``z``)."""
    return torch.stack([getattr(layer, name) for layer in out.layers]).mean().detach()
