"""Routing modes of the modularity tools: ``full``, ``pool:P``, ``running:P`` and ``causal:P:N``.

* ``full``: no document pool (every router picks its top-k over all routable experts).
* ``pool:P``: EMO document pools of P routable experts (the router's own pool over each whole segment; the
  standard router has none and ignores it).
* ``running:P``: every token's pool of P experts is the top-P of its document's summed router probabilities
  over the tokens up to and including itself (causal: no look-ahead; the router's ``pool_scope="running"``).
  At a document's last token it is the ``pool:P`` pool.
* ``causal:P:N``: each document's pool of P experts per layer is chosen from its first N tokens only, then
  fixed for the rest of the document (usable for generation); see :mod:`emo_lightning.experts.causal_pool`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

from emo_lightning.errors import UserError
from emo_lightning.model import EMOTransformer

RoutingKind = Literal["full", "pool", "running", "causal"]


@dataclass(frozen=True)
class Routing:
    kind: RoutingKind = "full"
    pool: int | None = None  # routable experts per document or token (pool, running, causal)
    prefix: int | None = None  # tokens the causal pool is chosen from

    def __str__(self) -> str:
        if self.kind == "full":
            return "full"
        if self.kind in ("pool", "running"):
            return f"{self.kind}:{self.pool}"
        return f"causal:{self.pool}:{self.prefix}"


FULL = Routing()


def parse_routing(spec: str) -> Routing:
    """``full`` | ``pool:P`` | ``running:P`` | ``causal:P:N`` (P >= 1 experts, N >= 1 tokens)."""
    parts = spec.strip().split(":")
    try:
        if parts == ["full"]:
            return Routing()
        if parts[0] in ("pool", "running") and len(parts) == 2 and int(parts[1]) >= 1:
            return Routing(parts[0], int(parts[1]))  # type: ignore[arg-type]
        if parts[0] == "causal" and len(parts) == 3 and int(parts[1]) >= 1 and int(parts[2]) >= 1:
            return Routing("causal", int(parts[1]), int(parts[2]))
    except ValueError:
        pass
    raise UserError(
        f"--routing {spec!r}: unknown routing",
        "use full, pool:P, running:P or causal:P:N (positive integers)",
    )


@contextmanager
def eval_routing(model: EMOTransformer, routing: Routing) -> Iterator[None]:
    """Eval mode with the routers' eval pool set for ``routing`` (restored afterwards).

    ``causal`` runs with no router pool: its pools are forced per batch by ``causal_pool``.
    """
    routers = model.routers()
    saved = [(r.eval_pool, r.pool_scope, r.forced_pool) for r in routers]
    was_training = model.training
    model.eval()
    pool = routing.pool if routing.kind in ("pool", "running") else None
    for r in routers:
        r.eval_pool = None if pool is None else max(r.k, min(pool, r.num_routed))
        r.pool_scope = "running" if routing.kind == "running" else "document"
        r.forced_pool = None
    try:
        yield
    finally:
        for r, (p, scope, f) in zip(routers, saved, strict=True):
            r.eval_pool, r.pool_scope, r.forced_pool = p, scope, f
        model.train(was_training)
