"""Optimizer configuration: AdamW parameter groups and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from emo_lightning.errors import ConfigError
from emo_lightning.model import per_expert_key

TRAINABLE = ("all", "experts")


@dataclass
class OptimConfig:
    """AdamW and schedule hyper-parameters (defaults follow the EMO recipe, scaled for a tiny CPU model).

    Attributes:
        lr: peak learning rate, reached after ``warmup_steps``.
        betas: AdamW betas.
        eps: AdamW epsilon.
        weight_decay: decoupled weight decay for matrices; embeddings, norms and biases get none.
        warmup_steps: linear warm-up length in optimizer steps.
        decay_steps: length of the cosine decay (from step 0); ``None`` uses the trainer's ``max_steps``.
        min_lr_ratio: the cosine ends at ``lr * min_lr_ratio``.
        trainable: ``all``, or ``experts``: only the routed experts' weights train; embeddings, attention, norms,
            router and shared experts stay as loaded. A module update for ``emo-experts merge``: fine-tune a
            pruned subset this way and its experts go back into the full model without the dense weights
            they were tuned with (docs/modularity.md, issue 25).
    """

    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 100
    decay_steps: int | None = None
    min_lr_ratio: float = 0.1
    trainable: str = "all"

    def __post_init__(self) -> None:
        if self.trainable not in TRAINABLE:
            raise ConfigError(
                "optim.trainable", f"must be one of {', '.join(TRAINABLE)}, got {self.trainable!r}"
            )
        if self.lr <= 0:
            raise ConfigError("optim.lr", f"must be > 0, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError("optim.min_lr_ratio", f"must lie in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise ConfigError("optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if self.weight_decay < 0:
            raise ConfigError("optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        if self.decay_steps is not None and self.decay_steps <= 0:
            raise ConfigError(
                "optim.decay_steps", f"must be > 0 (or null: trainer.max_steps), got {self.decay_steps}"
            )


def parameter_groups(model: nn.Module, weight_decay: float, trainable: str = "all") -> list[dict]:
    """Split parameters into a decayed group (matrices) and an undecayed one (embeddings, norms, biases).

    Every group carries a ``name`` so that DeepSpeed can split off its MoE parameter groups later.
    ``trainable="experts"`` first freezes (``requires_grad=False``) every parameter but the routed experts' weights.
    """
    if trainable == "experts":
        experts = 0
        for name, param in model.named_parameters():
            where = per_expert_key(name)
            keep = where is not None and where[1].startswith("experts.")
            param.requires_grad_(keep)
            experts += keep
        if not experts:
            raise ValueError("optim.trainable=experts: the model has no routed expert weights")
    embedding_params = {
        id(p) for module in model.modules() if isinstance(module, nn.Embedding) for p in module.parameters()
    }
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or id(param) in embedding_params:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]


def warmup_cosine(step: int, warmup_steps: int, decay_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine down to ``min_lr_ratio`` at ``decay_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, decay_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(
    model: nn.Module, config: OptimConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over :func:`parameter_groups` with the warm-up + cosine schedule stepped every optimizer step."""
    decay_steps = config.decay_steps if config.decay_steps is not None else total_steps
    groups = parameter_groups(model, config.weight_decay, config.trainable)
    if any(getattr(p, "allreduce", True) is False for g in groups for p in g["params"]):
        # Expert-parallel parameters (DeepSpeed's markers): ZeRO needs them in its separate MoE groups.
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: warmup_cosine(step, config.warmup_steps, decay_steps, config.min_lr_ratio),
    )
    return optimizer, scheduler
