"""``emo-experts explore``: one self-contained HTML page to look at a model's experts (and a baseline's).

Three tabs: Documents (every token coloured by its cluster or its top expert at a layer; hovering or focusing a
token shows its experts and weights in every layer and its document's pool), Clusters (the toolkit's spherical
k-means of each layer's router probabilities: top domains, frequent tokens, the documents of a cluster) and
Experts (domain x expert usage per layer; the experts ``emo-experts select`` keeps per domain and keep fraction,
with the loss rise an ``emo-experts report`` measured). Everything is computed here; the page only draws it.
Plotly.js (inlined from the ``plotly`` package) draws the heatmaps; the page needs no network.

Each document is cut to the model's row length and runs alone in its row, so it is one segment with one pool.
Per-token arrays travel as base64 of little-endian integers (weights quantised to 1/255).
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from emo_lightning.checkpoint import LoadedModel, atomic_write_text, load_model
from emo_lightning.errors import UserError
from emo_lightning.experts.clustering import nmi, purity, router_features, spherical_kmeans
from emo_lightning.experts.documents import (
    DocBatch,
    Document,
    DocumentTokenizer,
    by_domain,
    load_documents,
    pack_documents,
)
from emo_lightning.experts.routes import iter_routes
from emo_lightning.experts.selection import layerwise_subset, parse_keep
from emo_lightning.model import FULL, EMOTransformer, Routing

PAGE = "explore_page"  # package folder of the template, style sheet and script
ROLES = ("emo", "baseline")  # --emo / --baseline; report.json names them "emo" / "standard"
REPORT_NAMES = {"emo": "emo", "baseline": "standard"}


@dataclass
class ExploreConfig:
    docs: int = 100  # documents shown, spread over the domains
    clusters: int = 32  # k of every layer's spherical k-means
    cluster_tokens: int = 40_000  # tokens each k-means is fitted on (the rest go to the nearest centre)
    keep: list[str] = field(default_factory=lambda: ["0.125", "0.25", "0.5"])
    calib_docs: int = 8  # per domain, the first shown documents that `select` is calibrated on
    routing: Routing = FULL
    seq_len: int | None = None  # tokens per document shown (default and maximum: the models' row length)
    batch_size: int = 16
    seed: int = 0


# ------------------------------------------------------------------------------------------------ documents
def pick_documents(docs: Sequence[Document], n: int) -> list[Document]:
    """Up to ``n`` documents spread over the domains (round robin in input order), grouped by domain."""
    groups = list(by_domain(docs).values())
    picked: list[tuple[int, int]] = []  # (domain index, position in the domain)
    for j in range(max((len(g) for g in groups), default=0)):
        picked += [(i, j) for i, g in enumerate(groups) if j < len(g)]
    return [groups[i][j] for i, j in sorted(picked[:n])]


def cut(docs: Sequence[Document], max_tokens: int) -> list[Document]:
    """Every document cut to its first ``max_tokens`` tokens."""
    return [Document(d.id, d.domain, d.tokens[:max_tokens]) for d in docs]


def row_batches(docs: Sequence[Document], seq_len: int, batch_size: int, pad_id: int) -> list[DocBatch]:
    """One document per row (each at most ``seq_len`` tokens: one segment, one pool), ``batch_size`` rows per
    batch; ``doc_index`` refers to ``docs``."""
    rows = []
    for i, d in enumerate(docs):
        (row,) = pack_documents([d], seq_len, 1, pad_id)  # (1,S), doc_index 0 / -1
        row.doc_index = torch.where(row.doc_index >= 0, i, -1)
        rows.append(row)
    names = [f.name for f in fields(DocBatch)]
    return [
        DocBatch(*(torch.cat([getattr(r, n) for r in rows[s : s + batch_size]]) for n in names))
        for s in range(0, len(rows), batch_size)
    ]


def token_texts(tok: DocumentTokenizer, docs: Sequence[Document]) -> list[list[str]]:
    """Every token's text, streamed so that a character split over several tokens goes to the token completing
    it (the others get ""): the texts of a document concatenate to its decoded text."""
    from tokenizers.decoders import DecodeStream

    out = []
    for d in docs:
        stream = DecodeStream(skip_special_tokens=False)
        out.append([stream.step(tok.tokenizer, int(t)) or "" for t in d.tokens])
    return out


# ----------------------------------------------------------------------------------------------- encoding
def pack_array(a: np.ndarray) -> dict[str, Any]:
    """An unsigned integer array as ``{dtype, shape, b64}`` (little-endian u8 or u16)."""
    dtype = "<u1" if a.size == 0 or int(a.max()) < 256 else "<u2"
    if a.size and (int(a.min()) < 0 or int(a.max()) >= 65536):
        raise ValueError("pack_array: values must lie in [0, 65535]")
    data = np.ascontiguousarray(a, dtype=dtype).tobytes()
    return {
        "dtype": "u8" if dtype == "<u1" else "u16",
        "shape": list(a.shape),
        "b64": base64.b64encode(data).decode(),
    }


def unpack_array(packed: dict[str, Any]) -> np.ndarray:
    """Inverse of :func:`pack_array`."""
    dtype = "<u1" if packed["dtype"] == "u8" else "<u2"
    return np.frombuffer(base64.b64decode(packed["b64"]), dtype=dtype).reshape(packed["shape"])


def quantise(weights: np.ndarray) -> np.ndarray:
    """Gate weights in [0, 1] -> u8 (w * 255, rounded)."""
    return np.clip(np.rint(weights * 255), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- the model
def _routes(
    model: EMOTransformer,
    docs: Sequence[Document],
    batches: Sequence[DocBatch],
    routing: Routing,
    pad_id: int,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray, list[list[list[int] | None]]]:
    """experts (T,L,k) and weights (T,L,k) of every shown token (documents in order) and each document's pool
    per layer (``None`` where the routing has no document pool)."""
    experts, weights, pools = [], [], []
    for rec in iter_routes(model, docs, batches, routing, pad_id, progress):
        experts.append(
            np.asarray([layer["experts"] for layer in rec["layers"]], dtype=np.int64).transpose(1, 0, 2)
        )
        weights.append(
            np.asarray([layer["weights"] for layer in rec["layers"]], dtype=np.float64).transpose(1, 0, 2)
        )
        # one row per document: one segment, so at most one pool per layer
        pools.append(
            [None if layer["pools"] is None else layer["pools"][0]["experts"] for layer in rec["layers"]]
        )
    return np.concatenate(experts), np.concatenate(weights), pools


def _cluster_summaries(
    assign: np.ndarray, domain: np.ndarray, ids: np.ndarray, k: int, n_domains: int, decode: Any
) -> list[dict[str, Any]]:
    """Per cluster: size, tokens per domain and the 8 most frequent tokens (assign, domain, ids: (T,))."""
    by_dom = np.bincount(assign * n_domains + domain, minlength=k * n_domains).reshape(k, n_domains)
    pair, count = np.unique(assign.astype(np.int64) << 32 | ids.astype(np.int64), return_counts=True)
    out = []
    for c in range(k):
        mine = (pair >> 32) == c
        top = np.argsort(-count[mine], kind="stable")[:8]
        out.append(
            {
                "size": int(by_dom[c].sum()),
                "domains": by_dom[c].tolist(),
                "tokens": [
                    [decode([int(t)]), int(n)]
                    for t, n in zip(pair[mine][top] & 0xFFFFFFFF, count[mine][top], strict=True)
                ],
            }
        )
    return out


def _report_part(
    report: dict[str, Any] | None, role: str, lm: LoadedModel, source: str
) -> dict[str, Any] | None:
    """The report's measurements of this model (``None`` without a report or without this model)."""
    if report is None:
        return None
    part = report.get("models", {}).get(REPORT_NAMES[role])
    if part is None:
        return None
    rc = lm.config.router
    measured = (part["router"]["num_experts"], part["router"]["num_shared"])
    if measured != (rc.num_experts, rc.num_shared):
        raise UserError(
            f"--report {source}: its {REPORT_NAMES[role]} model has {measured[0]} experts ({measured[1]} shared), "
            f"--{role} {lm.path} has {rc.num_experts} ({rc.num_shared})",
            f"pass the report folder that `emo-experts report --{role} {lm.path}` wrote",
        )
    return part


def _measured(
    part: dict[str, Any] | None, domain: str, count: int, ours: list[list[int]]
) -> dict[str, Any] | None:
    """The report's loss rise for (domain, kept experts): its largest shot count, random subsets, and how many of
    its kept experts per layer are ours."""
    if part is None or domain not in part["domains"]:
        return None
    label = next((lab for lab, c in part["keep_counts"].items() if c == count), None)
    if label is None:
        return None
    entry = part["domains"][domain]["keep"][label]
    shots = max(int(key.split("_")[1]) for key in entry if key.startswith("shots_"))
    best = entry[f"shots_{shots}"]
    overlap = [len(set(a) & set(b)) for a, b in zip(best.get("layers") or [], ours, strict=False)]
    return {"rise": best["rise"], "shots": shots, "random": entry["random"]["rise"], "overlap": overlap}


def model_view(
    role: str,
    lm: LoadedModel,
    full_docs: Sequence[Document],
    docs: Sequence[Document],
    domains: Sequence[str],
    tok: DocumentTokenizer,
    cfg: ExploreConfig,
    seq_len: int,
    report_part: dict[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Everything the page shows of one model: routes, per-layer clusters, usage and the selected subsets
    (with the loss rises ``report_part``, this model's part of an ``emo-experts report``, measured)."""
    model, rc = lm.model, lm.config.router
    n_layers, n_routed, d_count = len(model.blocks), rc.num_routed, len(domains)
    batches = row_batches(docs, seq_len, cfg.batch_size, tok.pad_id)
    experts, weights, pools = _routes(model, docs, batches, cfg.routing, tok.pad_id, progress)  # (T,L,k) x2
    feats, index, ids = router_features(model, batches, cfg.routing, progress)  # (T,L*E'), (T,), (T,)
    lengths = [len(d.tokens) for d in docs]
    if not np.array_equal(index, np.repeat(np.arange(len(docs)), lengths)) or len(experts) != len(index):
        raise RuntimeError("explore: routes and router features disagree on the token order")
    domain_of = {name: i for i, name in enumerate(domains)}
    domain = np.repeat([domain_of[d.domain] for d in docs], lengths)  # (T,)

    k = min(cfg.clusters, len(index))
    assign = np.zeros((n_layers, len(index)), dtype=np.int64)  # (L,T)
    layers = []
    for layer in tqdm(range(n_layers), desc=f"clusters {role}", unit="layer", disable=not progress):
        f = feats[:, layer * n_routed : (layer + 1) * n_routed]  # (T,E') this layer's router softmax
        fit = spherical_kmeans(f, k, max_tokens=cfg.cluster_tokens, seed=cfg.seed)
        assign[layer] = fit.assign(f)
        layers.append(
            {
                "nmi": round(nmi(domain, assign[layer]), 4),
                "purity": round(purity(domain, assign[layer]), 4),
                "clusters": _cluster_summaries(assign[layer], domain, ids, k, d_count, tok.decode),
            }
        )

    # usage: share of each domain's routed token slots per expert, (L,D,E')
    routed = experts[:, :, : rc.routed_k]  # (T,L,k')
    flat = (np.arange(n_layers)[None, :, None] * d_count + domain[:, None, None]) * n_routed + routed
    counts = np.bincount(flat.ravel(), minlength=n_layers * d_count * n_routed).reshape(
        n_layers, d_count, n_routed
    )
    usage = counts / np.maximum(counts.sum(-1, keepdims=True), 1)

    # the experts `emo-experts select --data <a domain's calibration documents> --keep K` keeps
    part = report_part
    keeps = {f"{float(text):g}": parse_keep(text, rc) for text in cfg.keep}
    keeps = {label: c for label, c in keeps.items() if c < rc.num_experts}
    select: dict[str, Any] = {}
    groups = by_domain(full_docs)
    jobs = [(dom, label) for dom in domains for label in keeps]
    for dom, label in tqdm(jobs, desc=f"select {role}", unit="subset", disable=not progress):
        calib = groups[dom][: cfg.calib_docs]
        batches_c = pack_documents(calib, lm.config.arch.max_seq_len, cfg.batch_size, tok.pad_id)
        subset = layerwise_subset(model, batches_c, keeps[label], cfg.routing)
        select.setdefault(dom, {"calibration": [d.id for d in calib], "keep": {}})["keep"][label] = {
            "layers": subset.layers,
            "measured": _measured(part, dom, keeps[label], subset.layers),
        }

    # each document's pool per layer (the model's, under pool:P), else the experts its tokens use
    offsets = np.cumsum([0, *lengths])
    used = [
        [np.unique(routed[offsets[i] : offsets[i + 1], layer]).tolist() for layer in range(n_layers)]
        for i in range(len(docs))
    ]
    return {
        "role": role,
        "label": "EMO" if rc.kind == "emo" else "standard MoE",
        "checkpoint": lm.path,
        "kind": rc.kind,
        "num_experts": rc.num_experts,
        "num_routed": n_routed,
        "num_shared": rc.num_shared,
        "top_k": rc.top_k,
        "routed_k": rc.routed_k,
        "layers": n_layers,
        "experts": pack_array(experts),  # (T,L,k)
        "weights": pack_array(quantise(weights)),  # (T,L,k) u8 = w * 255
        "clusters": pack_array(assign),  # (L,T)
        "k": k,
        "cluster_layers": layers,
        "usage": np.round(usage, 5).tolist(),  # (L,D,E')
        "pools": pools,  # [doc][layer] experts or null
        "used": used,  # [doc][layer] routed experts its tokens use
        "keeps": keeps,
        "select": select,
        "report": None if part is None else part.get("checkpoint"),
    }


# ------------------------------------------------------------------------------------------------- the page
def _asset(name: str) -> str:
    return (resources.files("emo_lightning.experts") / PAGE / name).read_text(encoding="utf-8")


def _plotly_js() -> tuple[str, str]:
    """The minified Plotly.js bundle the ``plotly`` package ships (MIT; its licence header stays) and its
    version."""
    try:
        import plotly
        from plotly.offline import get_plotlyjs
    except ImportError:
        raise UserError(
            "explore needs the plotly package (it ships the Plotly.js the page inlines)",
            "pip install -e . (or `make install`)",
        ) from None
    return get_plotlyjs(), plotly.__version__


def render_page(payload: dict[str, Any]) -> str:
    """The self-contained HTML page for a :func:`build_payload` result."""
    plotly_js, _ = _plotly_js()
    data = json.dumps(payload, separators=(",", ":"), ensure_ascii=True).replace("</", "<\\/")
    parts = {
        "TITLE": html.escape(payload["meta"]["title"]),
        "CSS": _asset("explore.css"),
        "DATA": data,
        "PLOTLY": plotly_js.replace("</script", "<\\/script"),
        "JS": _asset("explore.js"),
    }
    # one pass: a document quoting a placeholder stays text
    return re.sub(r"__(TITLE|CSS|DATA|PLOTLY|JS)__", lambda m: parts[m.group(1)], _asset("explore.html"))


def build_payload(
    models: dict[str, LoadedModel],
    data: str | Path,
    tok: DocumentTokenizer,
    cfg: ExploreConfig,
    report_dir: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Everything the page shows, as JSON-ready data: ``{meta, domains, docs, models}``."""
    for role, lm in models.items():
        if tok.vocab_size > lm.config.arch.vocab_size:
            raise UserError(
                f"--tokenizer: vocabulary {tok.vocab_size} exceeds the {role} model's {lm.config.arch.vocab_size}",
                "pass the tokenizer the models were trained with",
            )
    row = min(lm.config.arch.max_seq_len for lm in models.values())
    seq_len = min(cfg.seq_len or row, row)
    full_docs = pick_documents(load_documents(data, tok), cfg.docs)
    fix = "pass a JSON Lines file (or folder) of documents with a text each"
    if not full_docs:
        raise UserError(f"--data {data}: no documents", fix)
    docs = cut(full_docs, seq_len)
    domains = list(by_domain(docs))
    report, report_source = _read_report(report_dir)
    parts = {role: _report_part(report, role, lm, report_source) for role, lm in models.items()}
    texts = token_texts(tok, docs)
    views = [
        model_view(role, lm, full_docs, docs, domains, tok, cfg, seq_len, parts[role], progress)
        for role, lm in models.items()
    ]
    return {
        "meta": {
            "title": "emo-experts explore: " + " vs ".join(v["label"] for v in views),
            "data": str(data),
            "routing": str(cfg.routing),
            "seq_len": seq_len,
            "report": None if report_dir is None else str(report_dir),
            "plotly": _plotly_js()[1],
        },
        "domains": domains,
        "docs": [
            {"id": d.id, "domain": d.domain, "tokens": t, "length": len(full.tokens)}
            for d, t, full in zip(docs, texts, full_docs, strict=True)
        ],
        "models": views,
    }


def _read_report(report_dir: str | Path | None) -> tuple[dict[str, Any] | None, str]:
    if report_dir is None:
        return None, ""
    path = Path(report_dir)
    path = path / "report.json" if path.is_dir() else path
    fix = "pass the --out folder of `emo-experts report` (it holds report.json)"
    if not path.is_file():
        raise UserError(f"--report {report_dir}: no report.json there", fix)
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"--report {path}: not JSON ({err})", fix) from None
    if not isinstance(report, dict) or "models" not in report:
        raise UserError(f"--report {path}: not an emo-experts report (no models)", fix)
    return report, str(report_dir)


def explore(
    emo: str | Path,
    data: str | Path,
    out: str | Path,
    baseline: str | Path | None = None,
    cfg: ExploreConfig | None = None,
    tokenizer: str | Path = "data/tokenizer.json",
    report_dir: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Load the checkpoints, compute everything and write the page to ``out``; returns ``{bytes, docs, tokens}``."""
    cfg = cfg or ExploreConfig()
    if cfg.routing.kind == "causal":
        raise UserError(
            f"--routing {cfg.routing}: explore supports full, pool:P or running:P",
            "use `emo-experts routes --routing causal:P:N` for causal pools",
        )
    models = {"emo": load_model(emo)}
    if baseline is not None:
        models["baseline"] = load_model(baseline)
    tok = DocumentTokenizer(tokenizer)
    payload = build_payload(models, data, tok, cfg, report_dir, progress)
    atomic_write_text(out, render_page(payload))
    size = Path(out).stat().st_size
    return {
        "bytes": size,
        "docs": len(payload["docs"]),
        "tokens": sum(len(d["tokens"]) for d in payload["docs"]),
    }
