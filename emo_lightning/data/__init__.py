"""Shard streaming, node/worker splitting and packing (reads shards + manifest only; no model imports).

The on-disk format (file names, sample fields, ``manifest.json``) is defined once, in ``data_tools.manifest``.
"""

from emo_lightning.data.datamodule import ShardDataModule, StreamLoader
from emo_lightning.data.dataset import PackedShardDataset
from emo_lightning.data.packing import IGNORE_INDEX, PAD_DOMAIN, Packer

__all__ = ["IGNORE_INDEX", "PAD_DOMAIN", "PackedShardDataset", "Packer", "ShardDataModule", "StreamLoader"]
