"""Lightning callbacks: throughput, expert usage, balance and routing-collapse warnings."""

from emo_lightning.callbacks.expert_usage import ExpertUsageMonitor, RoutingCollapseWarning
from emo_lightning.callbacks.throughput import TokenThroughputMonitor

__all__ = ["ExpertUsageMonitor", "RoutingCollapseWarning", "TokenThroughputMonitor"]
