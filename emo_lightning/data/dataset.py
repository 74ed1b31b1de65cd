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

import random
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from emo_lightning.data.packing import Batch, Packer
from emo_lightning.data.shards import read_shard

TensorBatch = dict[str, torch.Tensor]


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

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[TensorBatch]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        if self.train:
            stream = self.train_batches((worker + self.skip_batches) % workers, workers)
        else:
            stream = self.single_pass_batches(worker, workers)
        for batch in stream:
            yield {k: torch.from_numpy(v) for k, v in batch.items()}

    def _docs(self, url: str, expected: int | None) -> Iterator[tuple[np.ndarray, int]]:
        seen = 0
        for key, tokens, domain in read_shard(url):
            did = self.domains.get(domain)
            if did is None:
                raise ValueError(
                    f"{url}: document {key!r} has domain {domain!r}, not in the manifest's domains"
                )
            seen += len(tokens)
            yield tokens, did
        if expected is not None and seen != expected:
            raise ValueError(f"{url}: holds {seen} tokens but the manifest says {expected}: stale manifest?")

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
        for tokens, domain in self._shuffled_docs(worker, chunk, picks):
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

    def _shuffled_docs(self, worker: int, chunk: int, picks: list[int]) -> Iterator[tuple[np.ndarray, int]]:
        """The chunk's documents through a shuffle buffer seeded by (seed, rank, worker, chunk)."""
        seed = np.random.SeedSequence([self.seed, self.rank, worker, chunk, 1]).generate_state(1)[0]
        rng = random.Random(int(seed))
        size = self.shuffle_buffer
        buffer: list[tuple[np.ndarray, int]] = []
        for i in picks:
            for doc in self._docs(self.urls[i], None):
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
