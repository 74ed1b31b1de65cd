"""Token-weighted language-model loss, overall and per domain, as torchmetrics metrics."""

from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.aggregation import MeanMetric


class TokenPerplexity(MeanMetric):
    """Perplexity = exp(token-weighted mean cross-entropy); update with ``(mean_ce, n_tokens)``."""

    def compute(self) -> torch.Tensor:
        return torch.exp(super().compute())


class DomainLoss(Metric):
    """Sum of per-token cross-entropy and token counts per domain, summed over processes.

    ``update(token_loss, domain_ids)`` takes flat ``(N,)`` tensors; tokens with a negative domain id
    (padding) or a non-finite loss marker are ignored by the caller passing only valid tokens.
    """

    full_state_update = False

    def __init__(self, num_domains: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_domains = num_domains
        self.add_state("loss_sum", torch.zeros(num_domains, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.zeros(num_domains, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, token_loss: torch.Tensor, domain_ids: torch.Tensor) -> None:
        domain_ids = domain_ids.long()
        self.loss_sum.index_add_(0, domain_ids, token_loss.detach().to(torch.float64))
        self.tokens.index_add_(0, domain_ids, torch.ones_like(domain_ids, dtype=torch.float64))

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean loss per domain (NaN where a domain had no tokens) and the token count per domain."""
        mean = self.loss_sum / self.tokens.clamp_min(1)
        return torch.where(self.tokens > 0, mean, torch.full_like(mean, float("nan"))), self.tokens
