"""Modularity toolkit: expert routes, subset selection, evaluation, export and the report (no Lightning).

Routing modes, pruning and checkpoints live with the model (``emo_lightning.model``: ``Routing``,
``EMOTransformer.routing``, ``prune_model``) and in ``emo_lightning.checkpoint``; the toolkit asks the model.
"""

from emo_lightning.experts.documents import (
    DocBatch,
    Document,
    DocumentTokenizer,
    load_documents,
    pack_documents,
    split_documents,
)
from emo_lightning.experts.evaluate import document_losses, domain_table, evaluate
from emo_lightning.experts.inference import causal_allowed, forward_documents, prefix_pools
from emo_lightning.experts.selection import Subset, layerwise_subset, parse_keep, random_subset

__all__ = [
    "DocBatch",
    "Document",
    "DocumentTokenizer",
    "Subset",
    "causal_allowed",
    "document_losses",
    "domain_table",
    "evaluate",
    "forward_documents",
    "layerwise_subset",
    "load_documents",
    "pack_documents",
    "parse_keep",
    "prefix_pools",
    "random_subset",
    "split_documents",
]
