"""Lightning callbacks: throughput, expert usage, balance and routing-collapse warnings, tokens per domain."""

from emo_lightning.callbacks.domain_tokens import DomainTokenMonitor
from emo_lightning.callbacks.throughput import TokenThroughputMonitor
from emo_lightning.callbacks.usage_monitor import ExpertUsageMonitor, RoutingCollapseWarning

__all__ = ["DomainTokenMonitor", "ExpertUsageMonitor", "RoutingCollapseWarning", "TokenThroughputMonitor"]
