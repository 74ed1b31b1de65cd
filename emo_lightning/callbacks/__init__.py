"""Lightning callbacks: throughput (and, later, expert usage and balance)."""

from emo_lightning.callbacks.throughput import TokenThroughputMonitor

__all__ = ["TokenThroughputMonitor"]
