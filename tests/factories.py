"""Builders shared by the tests (import as ``from tests.factories import ...``)."""

from __future__ import annotations

from emo_lightning.lit_module import EMOLitModule
from emo_lightning.model import ArchConfig, RouterConfig
from emo_lightning.optim import OptimConfig


def tiny_lit_module(
    kind: str = "emo", num_experts: int = 8, lr: float = 3e-3, warmup_steps: int = 2, **router: object
) -> EMOLitModule:
    """The tiny model of the training tests: d_model 32, 2 layers, ``num_experts`` experts (1 shared, top-3,
    pools of 2 .. ``num_experts - 1`` routed experts, 3 in evaluation); ``router`` sets other router fields."""
    return EMOLitModule(
        arch=ArchConfig(vocab_size=4096, d_model=32, n_layers=2, n_heads=2, expert_hidden=32, max_seq_len=64),
        router=RouterConfig(
            kind=kind, num_experts=num_experts, num_shared=1, top_k=3, pool_min=2, pool_max=num_experts - 1,
            pool_eval=3, **router,
        ),
        optim=OptimConfig(lr=lr, warmup_steps=warmup_steps),
    )  # fmt: skip
