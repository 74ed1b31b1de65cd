"""Worker of the 2-process gloo test of the global load balance (imported by test_losses.py)."""

from __future__ import annotations

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


def run(rank: int, world: int, init_file: str, payload_path: str, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        payload = torch.load(payload_path, weights_only=False)
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
        if rank == 0:
            torch.save(
                {
                    "grads": packed[: grads.numel()],
                    "loss": packed[grads.numel()],
                    "lb": packed[grads.numel() + 1 :],
                    "counts": balance.counts,
                    "tokens": balance.tokens,
                },
                out_path,
            )
    finally:
        dist.destroy_process_group()
