"""The packed-shard stream: node/worker splitting, shuffling, packing and exact fast-forward.

Two modes:

* **single pass** (``train=False``, validation): shards are split by rank, then by worker
  (``urls[rank::world][worker::num_workers]``), read in order and packed; each worker's last batch is padded.
  Every shard is read exactly once overall, every token emitted exactly once.
* **resampled** (``train=True``, pretraining): an infinite stream per (seed, rank, worker) made of
  independent *chunks*. Chunk ``c`` draws shards with replacement, with probability proportional to their
  token counts, from a generator seeded by ``(seed, rank, worker, c)`` until they hold
  ``chunk_batches * B * S`` tokens; their documents go through a shuffle buffer (seeded likewise) and the
  packer; the chunk yields exactly ``tokens // (B*S)`` batches (known from the manifest without reading) and
  drops its remainder. Fast-forward to batch ``k`` therefore replays only the cheap shard draws of the
  skipped chunks, then packs at most one chunk. The DataLoader interleaves its workers round-robin; after
  skipping ``k`` batches, physical worker ``i`` plays logical worker ``(i + k) % W`` so the loader resumes
  exactly at global batch ``k``.
"""

from __future__ import annotations

import itertools
import logging
import random
import tarfile
import zlib
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from emo_lightning.data.packing import Batch, Packer
from emo_lightning.data.shard_reader import read_shard

TensorBatch = dict[str, torch.Tensor]
log = logging.getLogger(__name__)

# What reading a damaged shard can raise (truncated tar or gzip, bad .npy header, undecodable member...).
_READ_ERRORS = (OSError, EOFError, ValueError, SyntaxError, zlib.error, tarfile.TarError)
#: Optional batch keys (0-d ``torch.long``) counting stream faults since the worker's previous batch.
SKIP_KEYS = ("skipped_shards", "skipped_docs")


class ShardFailureError(RuntimeError):
    """More shards failed to read than ``max_bad_shard_fraction`` allows."""


def batches_per_worker(tokens: Sequence[int], n: int) -> int:
    """Batches of ``n`` tokens a single pass over shards holding ``tokens`` yields (last one padded)."""
    return -(-sum(tokens) // n)


class PackedShardDataset(IterableDataset):
    """Yields whole packed batches: dicts of ``(B, S)`` ``torch.long`` tensors (use ``batch_size=None``).

    Args:
        urls: shard URLs (local paths or anything ``webdataset.gopen`` opens, e.g. ``pipe:...``).
        domains: domain name -> id.
        seq_len, batch_size: ``S`` and ``B``.
        pad_id: padding token id.
        train: resampled infinite stream (else an exact single pass).
        seed: base seed of shard draws and shuffle buffers.
        rank, world_size: this process's data-parallel rank and the number of ranks (passed explicitly).
        shuffle_buffer: documents in the shuffle buffer (training; ``<= 1`` disables shuffling).
        shard_tokens: tokens per URL from the manifest (required for training; checked in a single pass).
        skip_batches: batches of this rank's loader already consumed (exact fast-forward, training).
        even_batches: single pass: append all-padding batches so every rank yields the same number of batches
            (collectives such as expert-parallel all-to-all must run equally often on every rank).
        chunk_batches: minimum batches per training chunk (granularity of the reseeding).
        vocab_size: documents holding an id ``>= vocab_size`` are skipped (warning, ``skipped_docs``).
        max_bad_shard_fraction: a shard that fails to read (truncated, corrupt, fewer tokens than the manifest
            says) is skipped with a warning and counted (``skipped_shards``); when more than this fraction of
            all shards has failed in one worker, :class:`ShardFailureError` stops the stream.

    Robustness: in training, a chunk short of batches because of a failed shard is completed from
    replacement shards drawn with a generator seeded by ``(seed, rank, worker, chunk, 2)``, so every chunk
    still yields the number of batches the manifest predicts (exact resume stays exact). A domain missing from
    ``domains`` maps to the id of ``unknown`` if the vocabulary has one, else to ``-1`` (like padding).
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        domains: Mapping[str, int],
        seq_len: int,
        batch_size: int,
        pad_id: int,
        train: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 1000,
        shard_tokens: Sequence[int] | None = None,
        skip_batches: int = 0,
        even_batches: bool = False,
        chunk_batches: int = 32,
        vocab_size: int | None = None,
        max_bad_shard_fraction: float = 0.1,
    ) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if shard_tokens is not None and len(shard_tokens) != len(urls):
            raise ValueError(f"{len(shard_tokens)} shard token counts for {len(urls)} shards")
        if train and (shard_tokens is None or sum(shard_tokens) == 0):
            raise ValueError(
                "training needs the token count of every shard from the manifest (and some tokens)"
            )
        self.urls = list(urls)
        self.domains = dict(domains)
        self.seq_len, self.batch_size, self.pad_id = seq_len, batch_size, pad_id
        self.train, self.seed, self.rank, self.world_size = train, seed, rank, world_size
        self.shuffle_buffer = shuffle_buffer
        self.shard_tokens = list(shard_tokens) if shard_tokens is not None else None
        self.skip_batches = skip_batches
        self.even_batches = even_batches
        self.chunk_batches = chunk_batches
        if not 0.0 <= max_bad_shard_fraction <= 1.0:
            raise ValueError(f"max_bad_shard_fraction must be in [0, 1], got {max_bad_shard_fraction}")
        self.vocab_size, self.max_bad_shard_fraction = vocab_size, max_bad_shard_fraction
        self.bad_shards: dict[str, str] = {}  # url -> reason (this process / worker)
        self._skips = dict.fromkeys(SKIP_KEYS, 0)  # since the previous batch
        self._unknown_domains: set[str] = set()

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[TensorBatch]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        if self.train:
            stream = self.train_batches((worker + self.skip_batches) % workers, workers)
        else:
            stream = self.single_pass_batches(worker, workers)
        for batch in stream:
            out = {k: torch.from_numpy(v) for k, v in batch.items()}
            for key, n in self._skips.items():
                if n:
                    out[key] = torch.tensor(n, dtype=torch.long)
                    self._skips[key] = 0
            yield out

    def _docs(self, url: str, expected: int | None) -> Iterator[tuple[np.ndarray, int]]:
        """The documents of one shard; a read failure skips the rest of the shard (see ``_shard_failed``)."""
        seen = 0
        try:
            for key, tokens, domain in read_shard(url):
                seen += len(tokens)
                if self.vocab_size is not None and len(tokens) and int(tokens.max()) >= self.vocab_size:
                    self._skips["skipped_docs"] += 1
                    log.warning(
                        "%s: document %r skipped: token id %d >= vocabulary size %d",
                        url, key, int(tokens.max()), self.vocab_size,
                    )  # fmt: skip
                    continue
                yield tokens, self._domain_id(domain, url, key)
        except _READ_ERRORS as err:
            self._shard_failed(url, str(err))
            return
        if expected is not None and seen != expected:
            self._shard_failed(
                url, f"holds {seen} tokens but the manifest says {expected} (truncated or stale)"
            )

    def _domain_id(self, domain: str, url: str, key: str) -> int:
        did = self.domains.get(domain)
        if did is not None:
            return did
        fallback = self.domains.get("unknown", -1)
        if domain not in self._unknown_domains:
            self._unknown_domains.add(domain)
            log.warning(
                "%s: document %r has domain %r, not in the manifest's domains: its tokens get domain id %d",
                url, key, domain, fallback,
            )  # fmt: skip
        return fallback

    def _shard_failed(self, url: str, reason: str) -> None:
        """Skip a shard that cannot be read: warn, count, and stop when too many shards have failed."""
        reason = reason.removeprefix(f"{url}: ")
        first = url not in self.bad_shards
        self.bad_shards[url] = reason
        self._skips["skipped_shards"] += 1  # every failed read (a resampled bad shard fails again)
        n, total = len(self.bad_shards), len(self.urls)
        (log.warning if first else log.debug)(
            "skipping shard %s: %s (%d of %d shards failed so far)", url, reason, n, total
        )
        if n > self.max_bad_shard_fraction * total:
            listed = "; ".join(f"{u}: {r}" for u, r in list(self.bad_shards.items())[:5])
            raise ShardFailureError(
                f"{n} of {total} shards failed to read, more than max_bad_shard_fraction="
                f"{self.max_bad_shard_fraction}: {listed}{' ...' if n > 5 else ''}"
            )

    # ------------------------------------------------------------------ single pass
    def worker_shards(self, worker: int, workers: int, rank: int | None = None) -> list[int]:
        """Indices of the shards a (rank, worker) reads in a single pass: by rank, then by worker."""
        rank = self.rank if rank is None else rank
        return list(range(len(self.urls)))[rank :: self.world_size][worker::workers]

    def single_pass_batches(self, worker: int, workers: int) -> Iterator[Batch]:
        """Every token of this worker's shards exactly once; the last batch is padded."""
        packer = Packer(self.batch_size, self.seq_len, self.pad_id)
        for i in self.worker_shards(worker, workers):
            expected = self.shard_tokens[i] if self.shard_tokens is not None else None
            for tokens, domain in self._docs(self.urls[i], expected):
                packer.add(tokens, domain)
                while packer.ready():
                    yield packer.pop()
        yield from packer.flush()
        if self.even_batches and worker == 0 and self.shard_tokens is not None:
            for _ in range(self._rank_deficit(workers)):
                yield packer.pop()  # nothing pending: an all-padding batch

    def _rank_deficit(self, workers: int) -> int:
        """All-padding batches this rank adds so that every rank yields the same number of batches."""
        assert self.shard_tokens is not None
        n = self.batch_size * self.seq_len
        counts = [
            sum(
                batches_per_worker([self.shard_tokens[i] for i in self.worker_shards(w, workers, r)], n)
                for w in range(workers)
            )
            for r in range(self.world_size)
        ]
        return max(counts) - counts[self.rank]

    # ------------------------------------------------------------------ resampled training stream
    def chunk_plan(self, worker: int, chunk: int) -> tuple[list[int], int]:
        """Shards drawn for one chunk and the number of batches it yields (from manifest counts only)."""
        assert self.shard_tokens is not None
        tokens = np.asarray(self.shard_tokens, dtype=np.float64)
        cdf = np.cumsum(tokens) / tokens.sum()
        rng = np.random.default_rng([self.seed, self.rank, worker, chunk])
        n = self.batch_size * self.seq_len
        target = self.chunk_batches * n
        picks: list[int] = []
        total = 0
        while total < target:
            u = rng.random(8)
            for i in np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1).tolist():
                picks.append(i)
                total += self.shard_tokens[i]
                if total >= target:
                    break
        return picks, total // n

    def train_batches(self, worker: int, workers: int) -> Iterator[Batch]:
        """Logical worker ``worker``'s infinite stream, past the first ``skip_batches`` loader batches."""
        skip = max(0, -(-(self.skip_batches - worker) // workers))  # its share of the consumed batches
        chunk = 0
        while True:
            picks, n_batches = self.chunk_plan(worker, chunk)
            if skip < n_batches:
                break
            skip -= n_batches
            chunk += 1
        while True:
            picks, n_batches = self.chunk_plan(worker, chunk)
            for j, batch in enumerate(self._chunk(worker, chunk, picks, n_batches)):
                if j >= skip:
                    yield batch
            skip = 0
            chunk += 1

    def _chunk(self, worker: int, chunk: int, picks: list[int], n_batches: int) -> Iterator[Batch]:
        packer = Packer(self.batch_size, self.seq_len, self.pad_id)
        emitted = 0
        docs = itertools.chain(
            self._shuffled_docs(worker, chunk, picks), self._replacement_docs(worker, chunk)
        )
        for tokens, domain in docs:
            packer.add(tokens, domain)
            while packer.ready():
                yield packer.pop()
                emitted += 1
                if emitted == n_batches:
                    return  # the chunk's remainder (< B*S tokens) is dropped
        raise ValueError(
            f"chunk {chunk} of worker {worker} yielded {emitted} batches, the manifest predicts {n_batches}: "
            "do the shards match their manifest?"
        )

    def _replacement_docs(self, worker: int, chunk: int) -> Iterator[tuple[np.ndarray, int]]:
        """After shard failures: documents of shards drawn by (seed, rank, worker, chunk, 2).

        Known-bad shards are read again (and fail at the same place): a resumed worker, which has not met them
        yet, then sees exactly the documents the uninterrupted one saw.
        """
        assert self.shard_tokens is not None
        if not self.bad_shards:
            return
        tokens = np.asarray(self.shard_tokens, dtype=np.float64)
        rng = np.random.default_rng([self.seed, self.rank, worker, chunk, 2])
        for _ in range(100 * len(self.urls)):
            i = int(rng.choice(len(tokens), p=tokens / tokens.sum()))
            yield from self._docs(self.urls[i], self.shard_tokens[i])

    def _shuffled_docs(self, worker: int, chunk: int, picks: list[int]) -> Iterator[tuple[np.ndarray, int]]:
        """The chunk's documents through a shuffle buffer seeded by (seed, rank, worker, chunk)."""
        seed = np.random.SeedSequence([self.seed, self.rank, worker, chunk, 1]).generate_state(1)[0]
        rng = random.Random(int(seed))
        size = self.shuffle_buffer
        buffer: list[tuple[np.ndarray, int]] = []
        for i in picks:
            for doc in self._docs(
                self.urls[i], self.shard_tokens[i] if self.shard_tokens is not None else None
            ):
                if size <= 1:
                    yield doc
                elif len(buffer) < size:
                    buffer.append(doc)
                else:
                    j = rng.randrange(size)
                    yield buffer[j]
                    buffer[j] = doc
        rng.shuffle(buffer)
        yield from buffer
