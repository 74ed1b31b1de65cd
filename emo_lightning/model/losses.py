"""Losses: next-token cross-entropy (the training objective with the auxiliary terms), global load balance
and z-loss.

Load balance of one layer (routable experts only), the spec's formula::

    LB = (E'/k') * sum_e f_e * Pbar_e,   f_e = C_e / D

C_e: token-slot assignments to expert e (no gradient), D: token count, Pbar_e: local mean over tokens of the
masked scores s (the gradient path). sum_e C_e = k' D, so LB == 1 whenever the counts are perfectly balanced.

``GlobalLoadBalance`` makes C and D global: counts are summed over a process group (one all_reduce per forward
for all layers) and accumulated over the micro-batches of one optimizer step. The LB of micro-batch m uses the
counts of micro-batches 1..m of the step (the last one uses the exact whole-step counts; earlier ones see the
counts so far: the deliberate, causal approximation, as in Qwen's global-batch LB). It is exact for one
micro-batch, in particular for the data-parallel reduction. ``step_lb()`` gives the exact whole-step LB value
(for logging) from the accumulated counts and token-weighted Pbar.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100  # label of a position with no next token of the same document (the batch contract)


def token_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token cross-entropy of every position in fp32, 0 where the label is ``IGNORE_INDEX``.
    logits: (B,S,V); labels: (B,S) -> (B*S,)."""
    return F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    )


def objective(logits: Tensor, labels: Tensor, aux_loss: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The training loss: mean cross-entropy over the targets plus the weighted auxiliary losses.
    -> (loss, ce, n_targets) (the last two detached-ready values for logging)."""
    n_targets = (labels != IGNORE_INDEX).sum()
    ce = token_cross_entropy(logits, labels).sum() / n_targets.clamp_min(1)
    return ce + aux_loss, ce, n_targets


def z_loss(logits: Tensor) -> Tensor:
    """Mean over rows of logsumexp(logits)^2. logits: (..., C) (may contain -inf) -> ()."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


def load_balance(counts: Tensor, tokens: Tensor | float, pbar: Tensor, routed_k: int) -> Tensor:
    """(E'/k') * sum_e (counts_e / tokens) * pbar_e. counts, pbar: (..., E') -> (...). Gradient via pbar
    only."""
    e = counts.shape[-1]
    f = counts.detach().to(pbar.dtype) / tokens
    return (e / routed_k) * (f * pbar).sum(-1)


class GlobalLoadBalance:
    """Running per-layer expert counts of the current optimizer step, summed over a process group.

    The owner calls ``reset()`` at the start of every optimizer step and passes the object to every forward of
    that step (``model(..., balance=gb)``). ``group`` follows torch.distributed: ``None`` = the default
    (world) group; no reduction happens when torch.distributed is not initialised, the group has one rank, or
    ``sync=False``.
    """

    def __init__(
        self, n_layers: int, n_experts: int, top_k: int, group: Any = None, sync: bool = True
    ) -> None:
        """n_experts: routable experts E' (= num_experts - num_shared); top_k: routed experts per token k'."""
        self.n_layers, self.n_experts, self.top_k = n_layers, n_experts, top_k
        self.group, self.sync = group, sync
        self.counts: Tensor | None = None  # (L,E') float64, global running counts of the step
        self.pbar_sum: Tensor | None = None  # (L,E') float64, global running sum over tokens of s (detached)
        self.tokens: Tensor | None = None  # () float64, global running token count of the step
        self.updates = 0

    @classmethod
    def for_model(cls, cfg: Any, group: Any = None, sync: bool = True) -> GlobalLoadBalance:
        """From a ModelConfig."""
        return cls(cfg.arch.n_layers, cfg.router.num_routed, cfg.router.routed_k, group=group, sync=sync)

    def reset(self) -> None:
        self.counts = self.pbar_sum = self.tokens = None
        self.updates = 0

    def _world(self) -> int:
        if not (self.sync and dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.group)

    def update(self, counts: Tensor, pbar: Tensor, tokens: int) -> tuple[Tensor, Tensor]:
        """Add one forward's local statistics; returns the running global (counts (L,E'), tokens ()) in
        float64.

        counts: (L,E') local token-slot counts; pbar: (L,E') local mean scores (detached here); tokens: local
        token count. One all_reduce of a flat float64 buffer (exact for counts < 2^53).
        """
        n_l, e = counts.shape
        buf = torch.cat(
            [
                counts.detach().double().reshape(-1),
                (pbar.detach().double() * tokens).reshape(-1),
                torch.full((1,), float(tokens), dtype=torch.float64, device=counts.device),
            ]
        )
        if self._world() > 1:
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
        c, p, t = buf[: n_l * e].view(n_l, e), buf[n_l * e : 2 * n_l * e].view(n_l, e), buf[-1]
        if self.counts is None:
            self.counts, self.pbar_sum, self.tokens = c, p, t
        else:
            self.counts, self.pbar_sum, self.tokens = self.counts + c, self.pbar_sum + p, self.tokens + t
        self.updates += 1
        return self.counts, self.tokens

    def step_lb(self) -> Tensor:
        """Exact LB per layer (L,) of everything accumulated in this step (no grad), for logging."""
        if self.counts is None:
            raise RuntimeError("GlobalLoadBalance.step_lb() called before any update in this step")
        return load_balance(self.counts, self.tokens, self.pbar_sum / self.tokens, self.top_k)

    def fractions(self) -> Tensor:
        """f_e = C_e / D per layer (L,E'); sums to k' per layer."""
        if self.counts is None:
            raise RuntimeError("GlobalLoadBalance.fractions() called before any update in this step")
        return self.counts / self.tokens
