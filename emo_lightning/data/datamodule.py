"""``ShardDataModule``: packed batches from tokenised WebDataset shards (see ``data/README.md``)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from data_tools.manifest import Manifest
from emo_lightning.data.dataset import PackedShardDataset
from emo_lightning.data.shard_reader import expand_shards, load_manifest, shard_infos, shard_tokens
from emo_lightning.errors import ConfigError, UserError


class StreamLoader(DataLoader):
    """A ``DataLoader(batch_size=None)`` that asks for the stream position each time it is iterated.

    Each new iteration (a new epoch, or the first one after a resume) sets the dataset's ``skip_batches``
    before the workers are started, so the stream continues where the previous one stopped.
    """

    def __init__(self, dataset: PackedShardDataset, position: Callable[[], int] | None = None, **kwargs: Any):
        super().__init__(dataset, batch_size=None, **kwargs)
        self.position = position

    def __iter__(self):
        if self.position is not None:
            self.dataset.skip_batches = self.position()  # type: ignore[attr-defined]
        return super().__iter__()


class ShardDataModule(L.LightningDataModule):
    """Streams tokenised shards and packs them into ``(B, S)`` batches of ``input_ids``, ``labels``,
    ``doc_ids`` and ``domain_ids`` (the batch contract of ``docs/architecture.md``).

    Args:
        train_shards: a shard directory holding ``manifest.json``, a brace pattern
            (``data/shards/train/shard-{000000..000063}.tar``,
            ``pipe:aws s3 cp s3://b/shard-{000..099}.tar -``),
            or several of these separated by ``::``.
        val_shards: the same for validation (an exact single pass), or ``None`` for no validation.
        manifest: the training manifest (default: ``manifest.json`` beside local shards; required for URLs).
        seq_len: tokens per row ``S``.
        batch_size: rows per batch ``B`` (per rank, per micro-batch).
        num_workers: DataLoader worker processes (shards are split between them).
        shuffle_buffer: documents in the training shuffle buffer.
        seed: base seed of the training stream (identical across runs for equal seed, world size and workers).
        rank, world_size: override the data-parallel rank and size (default: from the trainer).
        max_bad_shard_fraction: shards that fail to read are skipped with a warning and counted (batch key
            ``skipped_shards``, logged as ``data/skipped_shards``); more than this fraction of failed shards stops
            the run with ``ShardFailureError``. Documents with token ids outside the manifest's vocabulary are
            skipped (``data/skipped_docs``).
        mix: training domain mixture, domain -> weight (OLMo-style; weights >= 0, normalised to shares of the
            training tokens): documents are sampled by domain weight; domains left out are not trained on.
            ``None`` (default): the corpus's own mix. Realised shares are logged by ``DomainTokenMonitor``
            (``data/token_share/<domain>``); validation is never reweighted.
    """

    def __init__(
        self,
        train_shards: str,
        val_shards: str | None = None,
        manifest: str | None = None,
        seq_len: int = 256,
        batch_size: int = 16,
        num_workers: int = 1,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        max_bad_shard_fraction: float = 0.1,
        mix: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("seq_len", seq_len, 1),
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
            ("shuffle_buffer", shuffle_buffer, 0),
        ):
            if value < low:
                raise ConfigError(f"data.{name}", f"must be >= {low}, got {value}")
        if not 0.0 <= max_bad_shard_fraction <= 1.0:
            raise ConfigError(
                "data.max_bad_shard_fraction", f"must lie in [0, 1], got {max_bad_shard_fraction}"
            )
        self.train_shards, self.val_shards, self.manifest_path = train_shards, val_shards, manifest
        self.seq_len, self.batch_size, self.num_workers = seq_len, batch_size, num_workers
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.rank_override, self.world_size_override = rank, world_size
        self._manifest: Manifest | None = None
        self._val: tuple[list[str], Manifest | None] | None = None
        self._train_urls: list[str] | None = None
        self._domains: dict[str, int] | None = None
        self._resume_batches: int | None = None
        self.max_bad_shard_fraction = max_bad_shard_fraction
        self.mix = check_mix(mix)
        self._mix_checked = False

    # ------------------------------------------------------------------ manifest-derived attributes
    @property
    def manifest(self) -> Manifest:
        """The training manifest (read on first use)."""
        if self._manifest is None:
            urls, implied = expand_shards(self.train_shards, "data.train_shards")
            location = self.manifest_path or implied
            if location is None:
                raise UserError(
                    f"data.train_shards: cannot locate the manifest of {self.train_shards!r}",
                    "pass --data.manifest (the manifest.json of these shards)",
                )
            self._manifest, self._train_urls = load_manifest(location), urls
        return self._manifest

    @property
    def domain_vocab(self) -> dict[str, int]:
        """Domain name -> id: the training manifest's, extended by domains seen only in validation."""
        if self._domains is None:
            domains = dict(self.manifest.domains)
            _, val_manifest = self._val_info()
            for name in sorted(set(val_manifest.domains) - set(domains)) if val_manifest else []:
                warnings.warn(f"validation domain {name!r} is not in the training manifest", stacklevel=2)
                domains[name] = len(domains)
            self._domains = domains
        return self._domains

    @property
    def domains(self) -> list[str]:
        """Domain names; the index is the domain id used in ``domain_ids``."""
        return sorted(self.domain_vocab, key=self.domain_vocab.__getitem__)

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    @property
    def eos_id(self) -> int:
        return self.manifest.eos_id

    @property
    def pad_id(self) -> int:
        return self.manifest.pad_id

    def _val_info(self) -> tuple[list[str], Manifest | None]:
        if self._val is None:
            if self.val_shards is None:
                self._val = ([], None)
            else:
                urls, location = expand_shards(self.val_shards, "data.val_shards")
                val_manifest = load_manifest(location) if location else None
                if val_manifest is not None:
                    ours = self.manifest.tokenizer.get("sha256")
                    theirs = val_manifest.tokenizer.get("sha256")
                    if ours and theirs and ours != theirs:
                        raise UserError(
                            f"{val_manifest.source}: validation shards were built with another tokenizer "
                            f"(sha256 {theirs[:12]}, training {ours[:12]})",
                            "rebuild them with the training shards' tokenizer",
                        )
                self._val = (urls, val_manifest)
        return self._val

    # ------------------------------------------------------------------ Lightning hooks
    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        rank = (
            self.rank_override if self.rank_override is not None else (trainer.global_rank if trainer else 0)
        )
        world = (
            self.world_size_override
            if self.world_size_override is not None
            else (trainer.world_size if trainer else 1)
        )
        return rank, world

    def setup(self, stage: str | None = None) -> None:
        """Read the manifests (then ``domains``, ``vocab_size``, ``eos_id``, ``pad_id`` are available)."""
        _ = self.domain_vocab
        self._check_mix_domains()

    def _check_mix_domains(self) -> None:
        """``data.mix`` names domains of the training manifest; those it leaves out are announced once."""
        if self.mix is None or self._mix_checked:
            return
        known = self.manifest.domains
        for name in self.mix:
            if name not in known:
                raise ConfigError(
                    f"data.mix: unknown domain {name!r}",
                    f"the training shards have {', '.join(sorted(known))}",
                )
        left_out = sorted(set(known) - {k for k, w in self.mix.items() if w > 0})
        if left_out:
            warnings.warn(
                f"data.mix: domains {', '.join(left_out)} have no weight: their documents are not trained on",
                stacklevel=2,
            )
        self._mix_checked = True

    def _dataset(
        self, urls: list[str], tokens: list[int] | None, train: bool, domain_tokens: list | None = None
    ) -> PackedShardDataset:
        rank, world = self._rank_world()
        return PackedShardDataset(
            urls,
            domains=self.domain_vocab,
            seq_len=self.seq_len,
            batch_size=self.batch_size,
            pad_id=self.pad_id,
            train=train,
            seed=self.seed,
            rank=rank,
            world_size=world,
            shuffle_buffer=self.shuffle_buffer,
            shard_tokens=tokens,
            even_batches=not train and world > 1,
            vocab_size=self.vocab_size,
            max_bad_shard_fraction=self.max_bad_shard_fraction,
            mix=self.mix if train else None,
            shard_domain_tokens=domain_tokens,
        )

    def train_dataset(self) -> PackedShardDataset:
        """The resampled training stream of this rank (sampled by ``mix`` when one is given)."""
        manifest = self.manifest
        assert self._train_urls is not None
        self._check_mix_domains()
        infos = shard_infos(self._train_urls, manifest)
        if infos is None:
            raise UserError(
                f"data.train_shards: some shards are not listed in {manifest.source}",
                "point data.train_shards at the shard folder, or pass the manifest that lists them",
            )
        domain_tokens = [{k: v["tokens"] for k, v in s.domains.items()} for s in infos]
        return self._dataset(self._train_urls, [s.tokens for s in infos], True, domain_tokens)

    def val_dataset(self) -> PackedShardDataset | None:
        """The single-pass validation stream of this rank (``None`` without ``val_shards``)."""
        urls, val_manifest = self._val_info()
        if not urls:
            return None
        tokens = shard_tokens(urls, val_manifest) if val_manifest is not None else None
        return self._dataset(urls, tokens, train=False)

    def train_dataloader(self) -> StreamLoader:
        return StreamLoader(self.train_dataset(), position=self.train_position, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        dataset = self.val_dataset()
        return [] if dataset is None else DataLoader(dataset, batch_size=None, num_workers=self.num_workers)

    # ------------------------------------------------------------------ exact resume
    def consumed_batches(self) -> int:
        """Training batches this rank's loader has delivered to completed optimizer steps."""
        trainer = self.trainer
        if trainer is None:
            return self._resume_batches or 0
        return trainer.global_step * trainer.accumulate_grad_batches

    def train_position(self) -> int:
        """Where a new iteration of the training loader starts (a restored state is used once)."""
        if self._resume_batches is not None:
            position, self._resume_batches = self._resume_batches, None
            return position
        return self.consumed_batches()

    def state_dict(self) -> dict[str, Any]:
        return {"train_batches": self.consumed_batches()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_batches = int(state_dict.get("train_batches", 0))


def check_mix(mix: dict[str, float] | None) -> dict[str, float] | None:
    """``data.mix`` as floats, checked: weights finite and >= 0, some positive (domain names: at setup)."""
    if mix is None:
        return None
    if not isinstance(mix, dict) or not mix:
        raise ConfigError(
            "data.mix", f"must map domain names to weights, e.g. {{code: 0.5, math: 0.5}}, got {mix!r}"
        )
    out = {}
    for name, weight in mix.items():
        try:
            w = float(weight)
        except (TypeError, ValueError):
            raise ConfigError(f"data.mix.{name}", f"must be a number, got {weight!r}") from None
        if not math.isfinite(w) or w < 0:
            raise ConfigError(f"data.mix.{name}", f"must be a finite weight >= 0, got {weight!r}")
        out[str(name)] = w
    if sum(out.values()) <= 0:
        raise ConfigError("data.mix", "weights sum to 0: give at least one domain a positive weight")
    return out
