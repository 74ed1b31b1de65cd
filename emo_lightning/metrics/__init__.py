"""torchmetrics metrics: per-domain language-model loss and perplexity, expert usage (pure statistics in
``routing_stats``)."""

from emo_lightning.metrics.domain_loss import DomainLoss, TokenPerplexity
from emo_lightning.metrics.expert_usage import ExpertUsage, all_reduce_sum

__all__ = ["DomainLoss", "ExpertUsage", "TokenPerplexity", "all_reduce_sum"]
