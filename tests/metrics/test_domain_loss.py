"""``DomainLoss`` / ``TokenPerplexity`` against hand computations."""

from __future__ import annotations

import math

import torch

from emo_lightning.metrics import DomainLoss, TokenPerplexity


def test_domain_loss_is_the_token_weighted_mean_per_domain() -> None:
    metric = DomainLoss(3)
    metric.update(torch.tensor([1.0, 3.0, 2.0]), torch.tensor([0, 0, 2]))
    metric.update(torch.tensor([5.0]), torch.tensor([2]))  # a second batch accumulates
    losses, tokens = metric.compute()
    assert tokens.tolist() == [2.0, 0.0, 2.0]
    assert losses[0].item() == 2.0 and losses[2].item() == 3.5 and math.isnan(losses[1].item())
    metric.reset()
    assert metric.tokens.sum() == 0


def test_token_perplexity_weights_batches_by_tokens() -> None:
    ppl = TokenPerplexity()
    ppl.update(torch.tensor(1.0), torch.tensor(3))
    ppl.update(torch.tensor(2.0), torch.tensor(1))
    assert abs(ppl.compute().item() - math.exp((3 * 1.0 + 2.0) / 4)) < 1e-6
