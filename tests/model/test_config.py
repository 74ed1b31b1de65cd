"""Config validation: invalid combinations fail at construction, naming the field."""

from __future__ import annotations

import pytest

from emo_lightning.model import ArchConfig, ModelConfig, RouterConfig


def test_defaults_are_a_valid_tiny_emo_model() -> None:
    cfg = ModelConfig()
    assert cfg.router.kind == "emo"
    assert (cfg.router.num_routed, cfg.router.routed_k) == (15, 2)
    assert cfg.arch.head_dim == 32 and cfg.arch.kv_heads == 4


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"pool_min": 1}, "router.pool_min"),  # k' = 2
        ({"pool_eval": 1}, "router.pool_eval"),
        ({"num_shared": 3}, "router.num_shared"),  # shared >= k
        ({"num_shared": 4, "top_k": 3}, "router.num_shared"),
        ({"pool_max": 16}, "router.pool_max"),  # > E' = 15
        ({"pool_eval": 16}, "router.pool_eval"),
        ({"pool_min": 8, "pool_max": 5}, "router.pool_max"),
        ({"top_k": 17}, "router.top_k"),
        ({"pool_scope": "token"}, "router.pool_scope"),
        ({"lb_weight": -1.0}, "router.lb_weight"),
        ({"kind": "topk"}, "router.kind"),
        ({"num_experts": 0}, "router.num_experts"),
    ],
)
def test_invalid_router_fields_are_named(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        RouterConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n_heads": 3}, "arch.n_heads"),  # 128 % 3
        ({"d_model": 96, "n_heads": 32}, "arch.n_heads"),  # head size 3 is odd: RoPE
        ({"n_kv_heads": 3}, "arch.n_kv_heads"),
        ({"d_model": 0}, "arch.d_model"),
        ({"attention_backend": "xformers"}, "arch.attention_backend"),
        ({"init_std": 0.0}, "arch.init_std"),
    ],
)
def test_invalid_arch_fields_are_named(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        ArchConfig(**kwargs)


def test_message_has_the_offending_values() -> None:
    with pytest.raises(ValueError, match=r"pool_min=1.*k'=.*2|k'=.*2.*pool_min=1"):
        RouterConfig(pool_min=1)


def test_standard_router_ignores_pool_fields() -> None:
    cfg = RouterConfig(kind="standard", num_experts=8, top_k=2, pool_max=15)
    assert cfg.num_routed == 7


def test_model_config_accepts_nested_dicts() -> None:
    cfg = ModelConfig(arch={"d_model": 64, "n_heads": 2}, router={"kind": "standard"})
    assert isinstance(cfg.arch, ArchConfig) and cfg.arch.d_model == 64
    assert isinstance(cfg.router, RouterConfig) and cfg.router.kind == "standard"
    with pytest.raises(ValueError, match=r"router\.pool_min"):
        ModelConfig(router={"pool_min": 0})
