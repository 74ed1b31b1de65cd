"""Scale-out: DeepSpeed ZeRO-1/2 with expert parallelism (CPU/gloo and GPU), checkpoint consolidation."""

from emo_lightning.parallel.expert_parallel import (
    ExpertParallelMoE,
    convert_to_expert_parallel,
    validate_expert_parallel,
)
from emo_lightning.parallel.strategy import EMODeepSpeedStrategy

__all__ = [
    "EMODeepSpeedStrategy",
    "ExpertParallelMoE",
    "convert_to_expert_parallel",
    "validate_expert_parallel",
]
