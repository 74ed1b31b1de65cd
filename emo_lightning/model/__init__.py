"""EMO model core: pure PyTorch (no Lightning, no I/O)."""

from emo_lightning.model.attention import (
    Attention,
    AttentionMask,
    RMSNorm,
    Rotary,
    segment_index,
    segment_positions,
)
from emo_lightning.model.budget import ParamBudget, flops_per_token, param_counts
from emo_lightning.model.config import ArchConfig, ModelConfig, RouterConfig, derive_seed
from emo_lightning.model.decoding import DecodeCache, LayerCache
from emo_lightning.model.losses import (
    IGNORE_INDEX,
    GlobalLoadBalance,
    load_balance,
    objective,
    token_cross_entropy,
    z_loss,
)
from emo_lightning.model.moe import (
    DispatchPlan,
    LocalExchange,
    MoELayer,
    RoutedExperts,
    SharedExperts,
    combine,
    dispatch,
)
from emo_lightning.model.pruning import (
    check_subset,
    expert_parameter_counts,
    per_expert_key,
    prune_model,
    pruned_router_config,
    subset_mask,
)
from emo_lightning.model.router import Router, RouterOutput, document_pools, segment_ids
from emo_lightning.model.routing import FULL, Routing, parse_routing
from emo_lightning.model.transformer import (
    Block,
    EMOTransformer,
    LayerRouting,
    ModelOutput,
    ParameterSummary,
)

__all__ = [
    "FULL",
    "IGNORE_INDEX",
    "ArchConfig",
    "Attention",
    "AttentionMask",
    "Block",
    "DecodeCache",
    "DispatchPlan",
    "EMOTransformer",
    "GlobalLoadBalance",
    "LayerCache",
    "LayerRouting",
    "LocalExchange",
    "MoELayer",
    "ModelConfig",
    "ModelOutput",
    "ParamBudget",
    "ParameterSummary",
    "RMSNorm",
    "Rotary",
    "RoutedExperts",
    "Router",
    "RouterConfig",
    "RouterOutput",
    "Routing",
    "SharedExperts",
    "check_subset",
    "combine",
    "derive_seed",
    "dispatch",
    "document_pools",
    "expert_parameter_counts",
    "flops_per_token",
    "load_balance",
    "objective",
    "param_counts",
    "parse_routing",
    "per_expert_key",
    "prune_model",
    "pruned_router_config",
    "segment_ids",
    "segment_index",
    "segment_positions",
    "subset_mask",
    "token_cross_entropy",
    "z_loss",
]
