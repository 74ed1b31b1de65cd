"""Expert matmuls under autocast: the grouped path runs in autocast's dtype, as the loop path does."""

from __future__ import annotations

import pytest
import torch

from emo_lightning.model.moe import RoutedExperts, compute_dtype


def test_compute_dtype_follows_autocast() -> None:
    x = torch.zeros(2, 2)
    assert compute_dtype(x) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(x) == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert compute_dtype(x) == torch.float32


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm not available")
def test_grouped_mm_under_autocast_matches_loop() -> None:
    """fp32 tokens under bf16 autocast (the residual stream of ``bf16-mixed``): both paths compute in bf16."""
    torch.manual_seed(0)
    ex = RoutedExperts(5, 16, 16)
    ex.reset_parameters(0.2, seed=0, layer_idx=0)
    counts = torch.tensor([3, 0, 7, 0, 2])
    x = torch.randn(12, 16, requires_grad=True)
    cot = torch.randn(12, 16)
    outs = []
    for impl in ("loop", "grouped_mm"):
        ex.impl = impl
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = ex(x, counts)  # (M,d)
        assert y.dtype == torch.bfloat16
        outs.append((y, *torch.autograd.grad((y.float() * cot).sum(), [x, ex.w_in, ex.w_out])))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)
