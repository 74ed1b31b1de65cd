"""Inference routing modes: how the EMO routers choose a token's experts outside training.

A mode is set on the whole model with ``EMOTransformer.routing(Routing(...))`` (eval mode, restored afterwards)
and is spelled like the tools' ``--routing`` flag:

* ``full``: no pool; every router picks its top-k over all routable experts (the standard router always does).
* ``pool:P``: EMO document pools of P routable experts (the top-P of each segment's summed router
  probabilities, selection bias included).
* ``running:P``: every token's pool of P experts is the top-P of its document's summed router probabilities
  over the tokens up to and including itself (causal: no look-ahead). At a document's last token it is the
  ``pool:P`` pool.
* ``causal:P:N``: each document's pool of P experts per layer is chosen from its first N tokens only
  (``EMOTransformer.prefix_pools``: the router's own ``pool:P`` choice on the prefix), then fixed for the whole
  document by passing it as ``allowed`` to the forward; the routers themselves run unrestricted.

Independently of the mode, a forward's ``allowed`` ``(L, B|1, S|1, E')`` bool restricts the experts each token
may use in each layer (a subset of experts, or the causal pools of its document): pools, top-k and the reported
pools stay inside it, exactly as in a model pruned to those experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from emo_lightning.errors import UserError

RoutingKind = Literal["full", "pool", "running", "causal"]


@dataclass(frozen=True)
class Routing:
    """An inference routing mode (see the module docstring)."""

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
