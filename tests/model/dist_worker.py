"""One rank of the 2-process gloo test of the global load balance (``run_gloo`` in test_losses.py)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from emo_lightning.model import EMOTransformer, GlobalLoadBalance, ModelConfig


def step(
    model: EMOTransformer, batch: dict, balance: GlobalLoadBalance | None
) -> tuple[torch.Tensor, object]:
    """One training forward/backward: mean token cross-entropy + auxiliary losses."""
    out = model(batch["input_ids"], batch["doc_ids"], balance=balance)
    ce = F.cross_entropy(out.logits.flatten(0, 1), batch["labels"].flatten())
    loss = ce + out.aux_loss
    loss.backward()
    return loss.detach(), out


def run(rank: int, world: int, payload: dict[str, Any]) -> dict[str, torch.Tensor]:
    """This rank's rows of the batch with a world-wide balance; gradients, loss and LB averaged as DDP does."""
    cfg: ModelConfig = payload["cfg"]
    model = EMOTransformer(cfg)
    model.load_state_dict(payload["state"])
    rows = payload["batch"]["input_ids"].shape[0] // world
    local = {k: v[rank * rows : (rank + 1) * rows] for k, v in payload["batch"].items()}
    balance = GlobalLoadBalance.for_model(cfg)  # group None = world
    loss, out = step(model, local, balance)
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    lb = torch.stack([layer.lb for layer in out.layers])
    packed = torch.cat([grads, loss.view(1), lb])
    dist.all_reduce(packed)  # as DDP: average gradients (and losses, LB values)
    packed /= world
    n = grads.numel()
    model.update_expert_bias(
        balance.counts
    )  # auxiliary-loss-free step from the world's counts (if configured)
    bias = [r.expert_bias for r in model.routers() if r.expert_bias is not None]
    return {"grads": packed[:n], "loss": packed[n], "lb": packed[n + 1 :], "counts": balance.counts,
            "tokens": balance.tokens, "bias": torch.stack(bias) if bias else None}  # fmt: skip
