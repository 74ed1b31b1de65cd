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

With a domain **mixture** (``mix``: domain -> weight), a chunk's shards are drawn per domain instead: the
domain furthest behind its weight (least ``taken_d / w_d`` so far in this stream) draws a shard with probability
proportional to the shard's tokens of that domain, and takes from it every domain that is behind the level it
reaches; only those domains' documents of the shard enter the chunk. Every count comes from the manifest (the
tokens of each domain in each shard), so batches per chunk, and the exact fast-forward, stay known without
reading; the running totals carry from chunk to chunk, so each domain's share of the stream stays within one
shard's tokens of its weight (relative error shrinking as the stream grows).
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
#: A training chunk's shard: (shard index, domain ids whose documents it contributes; None: all of them).
Pick = tuple[int, frozenset[int] | None]


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
        mix: training: domain name -> weight (>= 0, normalised); documents are sampled by domain weight (see
            the module docstring). Needs ``shard_domain_tokens``. ``None``: the corpus's own mix.
        shard_domain_tokens: tokens of each domain (name -> tokens) in each shard, from the manifest.

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
        mix: Mapping[str, float] | None = None,
        shard_domain_tokens: Sequence[Mapping[str, int]] | None = None,
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
        self.mix_weights, self.domain_tokens = self._mixture(mix, shard_domain_tokens)
        self.bad_shards: dict[str, str] = {}  # url -> reason (this process / worker)
        self._skips = dict.fromkeys(SKIP_KEYS, 0)  # since the previous batch
        self._unknown_domains: set[str] = set()

    def _mixture(
        self, mix: Mapping[str, float] | None, shard_domain_tokens: Sequence[Mapping[str, int]] | None
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(weight per domain id ``(D,)`` summing to 1, integer tokens per shard and domain id ``(N, D)``)."""
        if mix is None:
            return None, None
        if shard_domain_tokens is None or len(shard_domain_tokens) != len(self.urls):
            raise ValueError("a mixture needs the tokens of each domain in each shard (from the manifest)")
        n_domains = max(self.domains.values(), default=-1) + 1
        weights = np.zeros(n_domains)
        for name, w in mix.items():
            if name not in self.domains or not (w >= 0 and np.isfinite(w)):
                raise ValueError(f"mix: bad domain or weight {name!r}: {w!r}")
            weights[self.domains[name]] = w
        tokens = np.zeros((len(self.urls), n_domains), dtype=np.int64)
        for i, counts in enumerate(shard_domain_tokens):
            for name, n in counts.items():
                if name in self.domains:
                    tokens[i, self.domains[name]] += n
        if weights.sum() <= 0 or (tokens.sum(0)[weights > 0] == 0).any():
            raise ValueError("mix: every weighted domain needs tokens, and some weight must be positive")
        return weights / weights.sum(), tokens

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

    def mixture_plans(self, worker: int) -> Iterator[tuple[list[Pick], int]]:
        """Chunks 0, 1, ... of a mixture stream: shards drawn per domain, by the deficit rule (module docs)."""
        assert self.mix_weights is not None and self.domain_tokens is not None
        w, tokens = self.mix_weights, self.domain_tokens  # (D,), (N, D)
        active = np.flatnonzero(w > 0)  # (A,)
        cumulative = {int(d): np.cumsum(tokens[:, d]) for d in active}  # integer CDFs: exact, no empty pick
        taken = np.zeros(len(w))  # (D,) tokens taken so far by this stream
        target = self.chunk_batches * self.batch_size * self.seq_len
        for chunk in itertools.count():
            rng = np.random.default_rng([self.seed, self.rank, worker, chunk])
            picks: list[Pick] = []
            total = 0
            while total < target:
                level = taken[active] / w[active]
                d = int(active[np.argmin(level)])
                cdf = cumulative[d]
                shard = int(np.searchsorted(cdf, rng.integers(cdf[-1]), side="right"))
                reach = (taken[d] + tokens[shard, d]) / w[d]
                take = active[(level < reach) & (tokens[shard, active] > 0)]  # d itself, and those behind
                taken[take] += tokens[shard, take]
                total += int(tokens[shard, take].sum())
                picks.append((shard, frozenset(take.tolist())))
            yield picks, total // (self.batch_size * self.seq_len)

    def chunk_plans(self, worker: int) -> Iterator[tuple[list[Pick], int]]:
        """``(picks, batches)`` of chunks 0, 1, ...: a pick is (shard index, domain ids kept or None for all)."""
        if self.mix_weights is not None:
            yield from self.mixture_plans(worker)
            return
        for chunk in itertools.count():
            picks, n_batches = self.chunk_plan(worker, chunk)
            yield [(i, None) for i in picks], n_batches

    def train_batches(self, worker: int, workers: int) -> Iterator[Batch]:
        """Logical worker ``worker``'s infinite stream, past the first ``skip_batches`` loader batches."""
        skip = max(0, -(-(self.skip_batches - worker) // workers))  # its share of the consumed batches
        for chunk, (picks, n_batches) in enumerate(self.chunk_plans(worker)):
            if skip >= n_batches:  # fast-forward: the plan alone says how many batches a chunk yields
                skip -= n_batches
                continue
            for j, batch in enumerate(self._chunk(worker, chunk, picks, n_batches)):
                if j >= skip:
                    yield batch
            skip = 0

    def _chunk(self, worker: int, chunk: int, picks: list[Pick], n_batches: int) -> Iterator[Batch]:
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
        keep = None if self.mix_weights is None else set(np.flatnonzero(self.mix_weights > 0).tolist())
        for _ in range(100 * len(self.urls)):
            i = int(rng.choice(len(tokens), p=tokens / tokens.sum()))
            for doc in self._docs(self.urls[i], self.shard_tokens[i]):
                if keep is None or doc[1] in keep:
                    yield doc

    def _shuffled_docs(self, worker: int, chunk: int, picks: list[Pick]) -> Iterator[tuple[np.ndarray, int]]:
        """The chunk's documents (of the kept domains) through a shuffle buffer seeded by (seed, rank, worker,
        chunk)."""
        seed = np.random.SeedSequence([self.seed, self.rank, worker, chunk, 1]).generate_state(1)[0]
        rng = random.Random(int(seed))
        size = self.shuffle_buffer
        buffer: list[tuple[np.ndarray, int]] = []
        for i, keep in picks:
            for doc in self._docs(
                self.urls[i], self.shard_tokens[i] if self.shard_tokens is not None else None
            ):
                if keep is not None and doc[1] not in keep:
                    continue
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
