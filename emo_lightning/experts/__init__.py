"""Modularity toolkit: expert routes, subset selection, pruning, evaluation and the report (no Lightning)."""

from emo_lightning.experts.causal_pool import forced_pools, prefix_pools
from emo_lightning.experts.checkpoint import LoadedModel, load_model, save_checkpoint
from emo_lightning.experts.documents import (
    DocBatch,
    Document,
    DocumentTokenizer,
    load_documents,
    pack_documents,
    split_documents,
)
from emo_lightning.experts.evaluate import document_losses, domain_table, evaluate
from emo_lightning.experts.prune import expert_parameter_counts, prune_model, pruned_router_config
from emo_lightning.experts.routing import FULL, Routing, parse_routing
from emo_lightning.experts.selection import Subset, layerwise_subset, parse_keep, random_subset

__all__ = [
    "FULL",
    "DocBatch",
    "Document",
    "DocumentTokenizer",
    "LoadedModel",
    "Routing",
    "Subset",
    "document_losses",
    "domain_table",
    "evaluate",
    "expert_parameter_counts",
    "forced_pools",
    "layerwise_subset",
    "load_documents",
    "load_model",
    "pack_documents",
    "parse_keep",
    "parse_routing",
    "prefix_pools",
    "prune_model",
    "pruned_router_config",
    "random_subset",
    "save_checkpoint",
    "split_documents",
]
