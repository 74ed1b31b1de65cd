"""Typed model configuration: architecture, router and their combination.

Plain dataclasses (read by LightningCLI / jsonargparse). Every field has a default; the defaults describe a
tiny CPU model (vocab 4096, d_model 128, 4 layers x 4 heads, 16 SwiGLU experts of hidden 128 with 1 shared,
top-3, training pools of 2..15 routable experts, unrestricted evaluation). Invalid combinations raise
``ConfigError`` (a ``ValueError`` and a user error: the command line shows it as one line) at construction, with
a message naming the field (``arch.n_heads``, ``router.pool_min``, ...) and the offending values. Treat them as
immutable values (they are argument defaults): derive a variant with ``dataclasses.replace``. (Not
``frozen=True``: Lightning's hyper-parameter logging rejects frozen dataclasses.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from emo_lightning.errors import ConfigError

RouterKind = Literal["emo", "standard"]
AttentionBackend = Literal["auto", "sdpa", "flex"]
PoolScope = Literal["document", "running"]
Balance = Literal["aux_loss", "bias", "both"]


def _fail(name: str, msg: str) -> None:
    raise ConfigError(name, msg)


def _positive(prefix: str, **fields: float) -> None:
    for name, value in fields.items():
        if value <= 0:
            _fail(f"{prefix}.{name}", f"must be > 0, got {value}")


@dataclass
class ArchConfig:
    """Decoder-only transformer shape (everything except the router)."""

    vocab_size: int = 4096
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None = n_heads (multi-head attention); fewer = grouped-query attention
    expert_hidden: int = 128  # SwiGLU hidden size of one expert
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    qk_norm: bool = False  # RMSNorm on queries and keys (per head) before RoPE
    doc_attention_mask: bool = True  # intra-document causal attention (never attend across doc_ids)
    init_std: float = 0.02  # truncated normal (+-3 std) for every weight matrix
    max_seq_len: int = 1024  # RoPE table length
    lm_head_z_weight: float = 0.0  # z-loss on the LM-head logits (spec: 1e-5 optional)
    attention_backend: AttentionBackend = "auto"  # auto = FlexAttention on CUDA, SDPA + boolean mask on CPU

    def __post_init__(self) -> None:
        p = "arch"
        _positive(
            p,
            vocab_size=self.vocab_size,
            d_model=self.d_model,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            expert_hidden=self.expert_hidden,
            rope_theta=self.rope_theta,
            norm_eps=self.norm_eps,
            init_std=self.init_std,
            max_seq_len=self.max_seq_len,
        )
        if self.d_model % self.n_heads:
            _fail(
                f"{p}.n_heads",
                f"must divide arch.d_model, got n_heads={self.n_heads}, d_model={self.d_model}",
            )
        if (self.d_model // self.n_heads) % 2:
            _fail(
                f"{p}.n_heads",
                f"head size d_model/n_heads={self.d_model // self.n_heads} must be even for RoPE",
            )
        if self.n_kv_heads is not None:
            _positive(p, n_kv_heads=self.n_kv_heads)
            if self.n_heads % self.n_kv_heads:
                _fail(
                    f"{p}.n_kv_heads",
                    f"must divide arch.n_heads, got n_kv_heads={self.n_kv_heads}, n_heads={self.n_heads}",
                )
        if self.lm_head_z_weight < 0:
            _fail(f"{p}.lm_head_z_weight", f"must be >= 0, got {self.lm_head_z_weight}")
        if self.attention_backend not in ("auto", "sdpa", "flex"):
            _fail(f"{p}.attention_backend", f"must be auto|sdpa|flex, got {self.attention_backend!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads


@dataclass
class RouterConfig:
    """Mixture-of-experts routing. ``num_experts`` and ``top_k`` include the shared experts.

    Pool fields (``pool_min``, ``pool_max``, ``pool_eval``) count routable experts (E' = E - n_sh) and are
    only validated for ``kind="emo"``; the standard router ignores them. Left unset they resolve to the spec's
    widest choice: training pools k'..E', unrestricted evaluation (pool_eval = E', the full model).
    """

    kind: RouterKind = "emo"
    num_experts: int = 16  # E, including shared experts
    num_shared: int = 1  # n_sh, always-on experts with gate weight exactly 1.0
    top_k: int = 3  # k, including shared experts (routed per token: k' = k - n_sh)
    pool_min: int | None = (
        None  # training pool size P ~ UniformInt[pool_min, pool_max] per document (None: k')
    )
    pool_max: int | None = None  # None: E' (some documents train unrestricted)
    pool_eval: int | None = None  # fixed pool size in eval mode (None: E', i.e. unrestricted)
    # which tokens choose a token's pool: "document" = all tokens of its document (the EMO spec; the pool of an
    # early token depends on later ones), "running" = the document's tokens up to and including itself (causal:
    # the same routing in training, validation and token-by-token generation, no look-ahead)
    pool_scope: PoolScope = "document"
    # rescale each token's k' routed gate weights to sum to 1 (Mixtral-style). Off = the reference (EMO spec):
    # the weights are the pool softmax, so their sum, and the expert output's scale, depends on the pool size.
    normalize_weights: bool = False
    lb_weight: float = 0.1  # total load-balance weight (each layer gets lb_weight / n_layers)
    # how the load is balanced: "aux_loss" = the global load-balance loss (the spec); "bias" = auxiliary-loss-free
    # (DeepSeek-V3): a per-expert bias added to the scores that *choose* experts (never to gate weights), moved
    # by bias_gamma * sign(mean load - load) after every optimizer step; "both" = the loss and the bias
    balance: Balance = "aux_loss"
    # DeepSeek-V3's step, for long runs; the bias moves at most bias_gamma per step, so a run of ~1000 steps needs
    # ~1e-2 to balance at all (1e-3 left EMO at imbalance ~7 after 900 steps: docs/modularity.md)
    bias_gamma: float = 0.001
    z_weight: float = 0.001  # total router z-loss weight (each layer gets z_weight / n_layers)
    seed: int = 0  # seeds pool-size generators and expert initialisation

    def __post_init__(self) -> None:
        p = "router"
        if self.kind not in ("emo", "standard"):
            _fail(f"{p}.kind", f"must be 'emo' or 'standard', got {self.kind!r}")
        _positive(p, num_experts=self.num_experts, top_k=self.top_k)
        if self.num_shared < 0:
            _fail(f"{p}.num_shared", f"must be >= 0, got {self.num_shared}")
        if self.num_shared >= self.top_k:
            _fail(
                f"{p}.num_shared",
                f"must be < router.top_k (k includes the shared experts), got num_shared={self.num_shared}, "
                f"top_k={self.top_k}",
            )
        if self.top_k > self.num_experts:
            _fail(
                f"{p}.top_k",
                f"must be <= router.num_experts, got top_k={self.top_k}, num_experts={self.num_experts}",
            )
        kr, er = self.routed_k, self.num_routed
        if kr > er:
            _fail(
                f"{p}.top_k",
                f"routed experts per token k'={kr} exceed routable experts E'={er} "
                f"(num_experts={self.num_experts}, num_shared={self.num_shared})",
            )
        if self.lb_weight < 0:
            _fail(f"{p}.lb_weight", f"must be >= 0, got {self.lb_weight}")
        if self.z_weight < 0:
            _fail(f"{p}.z_weight", f"must be >= 0, got {self.z_weight}")
        if self.balance not in ("aux_loss", "bias", "both"):
            _fail(f"{p}.balance", f"must be aux_loss, bias or both, got {self.balance!r}")
        if self.bias_gamma <= 0:
            _fail(f"{p}.bias_gamma", f"must be > 0, got {self.bias_gamma}")
        if self.pool_scope not in ("document", "running"):
            _fail(f"{p}.pool_scope", f"must be 'document' or 'running', got {self.pool_scope!r}")
        if self.kind == "emo":
            pools = dict(zip(("pool_min", "pool_max", "pool_eval"), self.resolved_pools(), strict=True))
            for name in ("pool_min", "pool_eval"):
                v = pools[name]
                if v < kr:
                    _fail(
                        f"{p}.{name}",
                        f"must be >= routed experts per token k'=top_k-num_shared={kr}, got {name}={v} "
                        "(top-k would pick experts outside the pool)",
                    )
            if pools["pool_max"] < pools["pool_min"]:
                _fail(
                    f"{p}.pool_max",
                    f"must be >= router.pool_min, got pool_max={pools['pool_max']}, pool_min={pools['pool_min']}",
                )
            for name in ("pool_max", "pool_eval"):
                v = pools[name]
                if v > er:
                    _fail(
                        f"{p}.{name}",
                        f"must be <= routable experts E'=num_experts-num_shared={er}, got {name}={v}",
                    )

    def resolved_pools(self) -> tuple[int, int, int]:
        """``(pool_min, pool_max, pool_eval)`` with unset (None) values resolved to k', E', E'."""
        kr, er = self.routed_k, self.num_routed
        return (
            kr if self.pool_min is None else self.pool_min,
            er if self.pool_max is None else self.pool_max,
            er if self.pool_eval is None else self.pool_eval,
        )

    @property
    def uses_bias(self) -> bool:
        """Whether the routers carry a selection bias (``balance`` bias or both)."""
        return self.balance != "aux_loss"

    @property
    def num_routed(self) -> int:
        """E' = E - n_sh, the routable experts (router rows)."""
        return self.num_experts - self.num_shared

    @property
    def routed_k(self) -> int:
        """k' = k - n_sh, routed experts per token."""
        return self.top_k - self.num_shared


@dataclass
class ModelConfig:
    """Architecture + router. Nested dicts are accepted and converted (e.g. from YAML)."""

    arch: ArchConfig = field(default_factory=ArchConfig)
    router: RouterConfig = field(default_factory=RouterConfig)

    def __post_init__(self) -> None:
        if isinstance(self.arch, dict):
            self.arch = ArchConfig(**self.arch)
        if isinstance(self.router, dict):
            self.router = RouterConfig(**self.router)
        if not isinstance(self.arch, ArchConfig):
            _fail("arch", f"must be an ArchConfig, got {type(self.arch).__name__}")
        if not isinstance(self.router, RouterConfig):
            _fail("router", f"must be a RouterConfig, got {type(self.router).__name__}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def derive_seed(*parts: int) -> int:
    """Deterministic 63-bit seed from integers (splitmix64 chain), e.g. ``derive_seed(seed, layer,
    expert)``."""
    mask = (1 << 64) - 1
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & mask)) * 0xBF58476D1CE4E5B9 & mask
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & mask
        h ^= h >> 29
    return h & ((1 << 63) - 1)
