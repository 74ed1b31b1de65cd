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
from emo_lightning.model.losses import GlobalLoadBalance, load_balance, z_loss
from emo_lightning.model.moe import (
    DispatchPlan,
    LocalExchange,
    MoELayer,
    RoutedExperts,
    SharedExperts,
    combine,
    dispatch,
)
from emo_lightning.model.router import Router, RouterOutput, pool_bias, pool_mask, segment_ids
from emo_lightning.model.transformer import (
    Block,
    EMOTransformer,
    LayerRouting,
    ModelOutput,
    ParameterSummary,
)

__all__ = [
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
    "SharedExperts",
    "combine",
    "derive_seed",
    "dispatch",
    "flops_per_token",
    "load_balance",
    "param_counts",
    "pool_bias",
    "pool_mask",
    "segment_ids",
    "segment_index",
    "segment_positions",
    "z_loss",
]
