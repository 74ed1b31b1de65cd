"""Lightning callbacks: throughput, expert usage, balance and routing-collapse warnings."""

from emo_lightning.callbacks.throughput import TokenThroughputMonitor
from emo_lightning.callbacks.usage_monitor import ExpertUsageMonitor, RoutingCollapseWarning

__all__ = ["ExpertUsageMonitor", "RoutingCollapseWarning", "TokenThroughputMonitor"]
