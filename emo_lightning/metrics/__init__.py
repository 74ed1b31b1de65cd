"""torchmetrics metrics: per-domain language-model loss and perplexity."""

from emo_lightning.metrics.domain_loss import DomainLoss, TokenPerplexity

__all__ = ["DomainLoss", "TokenPerplexity"]
