"""Scale-out: DeepSpeed ZeRO-1/2 with expert parallelism (CPU/gloo and GPU), checkpoint consolidation, cost."""

from emo_lightning.parallel.expert_parallel import (
    AllToAllExchange,
    DeepSpeedExperts,
    ExpertPlacement,
    apply_expert_parallel,
    build_expert_parallel_model,
    expert_parallel_rank,
    validate_expert_parallel,
)
from emo_lightning.parallel.strategy import EMODeepSpeedStrategy

__all__ = [
    "AllToAllExchange",
    "DeepSpeedExperts",
    "EMODeepSpeedStrategy",
    "ExpertPlacement",
    "apply_expert_parallel",
    "build_expert_parallel_model",
    "expert_parallel_rank",
    "validate_expert_parallel",
]
