"""The modularity report: how much of a model survives when it keeps only a few experts chosen per domain.

For each domain, keep fraction and shot count: the loss of EMO and of the standard MoE cut to the experts
selected (layer-wise, or every method of ``methods``: ``easy_ep``, ``easy_ep:global``...) from ``shots``
calibration documents of that domain, and cut to random subsets, relative to the same model with all experts;
evaluated on held-out documents of the domain (calibration and evaluation documents are disjoint). With
``tasks`` (a ``emo-data make-task`` folder) also the accuracy of every cut on the domain's task beside the
full model's (the paper's metric: the accuracy drop), leaving out the items built from calibration documents.
Plus the router clustering analysis. Writes ``report.json``, ``report.md`` and PNG plots.
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from emo_lightning.checkpoint import LoadedModel, atomic_write_text, load_model
from emo_lightning.errors import UserError
from emo_lightning.experts.clustering import cluster_tokens, router_features
from emo_lightning.experts.documents import (
    DocBatch,
    Document,
    DocumentTokenizer,
    load_documents,
    pack_documents,
    split_documents,
)
from emo_lightning.experts.evaluate import document_losses
from emo_lightning.experts.selection import parse_keep, random_subset, select_subset
from emo_lightning.model import Routing, expert_parameter_counts, prune_model


@dataclass
class ReportConfig:
    keep: list[str] = field(default_factory=lambda: ["0.0625", "0.125", "0.25", "0.5", "1"])
    shots: list[int] = field(default_factory=lambda: [1, 8])
    n_calib: int = 8  # calibration documents per domain (the s-shot set is the first s of them)
    n_eval: int = 50  # evaluation documents per domain (disjoint from calibration)
    random_seeds: int = 3  # random subsets per (domain, keep), averaged
    clusters: int = 32
    cluster_tokens: int = 40_000
    pool_prefix: int = 64  # causal pool demo: pool from the first N tokens
    seq_len: int = 256
    batch_size: int = 16
    seed: int = 0
    # selection methods besides random: layerwise (the column "shots_s"), easy_ep, and either with ":global"
    # (a variable keep per layer; column "<method>_global_s")
    methods: list[str] = field(default_factory=lambda: ["layerwise"])
    tasks: str | None = None  # a make-task folder: downstream accuracy of every cut on its domain's task


def column(method: str, shots: int) -> str:
    """The result key of a selection method at ``shots`` calibration documents (``shots_s`` = layer-wise)."""
    return f"shots_{shots}" if method == "layerwise" else f"{method.replace(':', '_')}_{shots}"


def columns(cfg: ReportConfig | dict[str, Any]) -> list[str]:
    """Every selected-subset column, then ``random``."""
    get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
    methods, shots = get("methods") or ["layerwise"], get("shots")
    return [column(m, s) for m in methods for s in shots] + ["random"]


def _loss(
    model,
    docs: Sequence[Document],
    batches: Sequence[DocBatch],
    routing: Routing,
    pad: int,
    score_from=None,
    allowed=None,
) -> float:
    dl = document_losses(model, docs, batches, routing, pad, score_from=score_from, allowed=allowed)
    return float(dl.loss_sum.sum() / dl.tokens.sum().clamp(min=1))


@dataclass
class _Tasks:
    """The make-task folder of a report: each domain's task and the items to score (not from calibration)."""

    folder: Path
    tokenizer: DocumentTokenizer
    by_domain: dict[str, tuple[str, list[int]]]  # domain -> (task, item indices)

    @classmethod
    def load(cls, folder: str, tok: DocumentTokenizer, calib: dict[str, list[Document]]) -> _Tasks:
        from emo_lightning.experts.harness import task_documents

        out = {}
        for task, info in task_documents(Path(folder)).items():
            seen = {d.id for d in calib.get(info["domain"], [])}
            out[info["domain"]] = (task, [i for i, d in enumerate(info["doc_ids"]) if d not in seen])
        return cls(Path(folder), tok, out)

    def accuracy(self, domain: str, model, allowed, batch_size: int) -> dict[str, Any] | None:
        """acc / acc_norm (and stderr, n) of ``model`` on ``domain``'s task; None without a task."""
        if domain not in self.by_domain:
            return None
        from emo_lightning.experts.harness import EMOHarnessLM, run_tasks

        task, items = self.by_domain[domain]
        lm = EMOHarnessLM(model, self.tokenizer, Routing(), allowed, batch_size, progress=False)
        return run_tasks(lm, [task], self.folder, samples={task: items})[task]


def _accuracy_entry(acc: dict[str, Any] | None, full: dict[str, Any] | None) -> dict[str, Any] | None:
    if acc is None or full is None:
        return None
    return {**acc, "drop": full["acc_norm"] - acc["acc_norm"], "drop_acc": full["acc"] - acc["acc"]}


def _keep_label(text: str) -> str:
    return f"{float(text):g}"


def _model_part(
    name: str,
    lm: LoadedModel,
    calib: dict[str, list[Document]],
    evals: dict[str, list[Document]],
    cfg: ReportConfig,
    pad: int,
    bar: tqdm,
    tasks: _Tasks | None = None,
) -> dict[str, Any]:
    """Every measurement of one model."""
    model, rc = lm.model, lm.config.router
    seq = min(cfg.seq_len, lm.config.arch.max_seq_len)
    keeps = {_keep_label(k): parse_keep(k, rc) for k in cfg.keep}
    full_params = expert_parameter_counts(model)
    res: dict[str, Any] = {
        "checkpoint": lm.path,
        "router": asdict(rc),
        "params": full_params,
        "keep_counts": keeps,
        "domains": {},
    }
    t0 = time.perf_counter()
    for domain in evals:
        ev = pack_documents(evals[domain], seq, cfg.batch_size, pad)
        full = _loss(model, evals[domain], ev, Routing(), pad)
        dres: dict[str, Any] = {
            "full_loss": full,
            "eval_tokens": int(sum(len(d.tokens) for d in evals[domain])),
        }
        kept_routed = max(rc.routed_k, round(0.25 * rc.num_routed))
        causal = Routing("causal", kept_routed, cfg.pool_prefix)
        dres["causal_pool"] = {"routing": str(causal), "loss": _loss(model, evals[domain], ev, causal, pad)}
        dres["causal_pool"]["full_same_tokens"] = _loss(
            model, evals[domain], ev, Routing(), pad, score_from=causal.prefix - 1
        )
        acc_full = tasks.accuracy(domain, model, None, 2 * cfg.batch_size) if tasks else None
        if acc_full is not None:
            dres["accuracy"] = acc_full
        sel: dict[str, dict[str, Any]] = {}
        for label, k in keeps.items():
            entry: dict[str, Any] = {"keep": k}
            if k >= rc.num_experts:
                same = {"loss": full, "rise": 0.0, "accuracy": _accuracy_entry(acc_full, acc_full)}
                entry.update({col: dict(same) for col in columns(cfg)[:-1]})
                entry["random"] = {**same, "seeds": []}
                sel[label] = entry
                continue
            for s in cfg.shots:
                cb = pack_documents(calib[domain][:s], seq, cfg.batch_size, pad)
                for method in cfg.methods:
                    base, _, budget = method.partition(":")
                    subset = select_subset(model, cb, k, base, budget=budget or "layer")
                    cut, allowed = subset.apply(model)
                    loss = _loss(cut, evals[domain], ev, Routing(), pad, allowed=allowed)
                    entry[column(method, s)] = {
                        "loss": loss,
                        "rise": loss / full - 1,
                        "layers": subset.layers,
                        "accuracy": _accuracy_entry(
                            tasks and tasks.accuracy(domain, cut, allowed, 2 * cfg.batch_size), acc_full
                        ),
                    }
                    bar.update()
            rl, ra = [], []
            for r in range(cfg.random_seeds):
                subset = random_subset(rc, len(model.blocks), k, seed=cfg.seed * 1000 + r)
                cut = prune_model(model, subset.layers)
                rl.append(_loss(cut, evals[domain], ev, Routing(), pad))
                if acc_full is not None:
                    ra.append(tasks.accuracy(domain, cut, None, 2 * cfg.batch_size))
                bar.update()
            mean = float(np.mean(rl))
            entry["random"] = {"loss": mean, "rise": mean / full - 1, "seeds": rl, "accuracy": None}
            if ra:
                pooled = {m: float(np.mean([a[m] for a in ra])) for m in ("acc", "acc_norm")}
                pooled |= {"n": ra[0]["n"], "seeds": [a["acc_norm"] for a in ra]}
                pooled |= {
                    f"{m}_stderr": float(np.mean([a[f"{m}_stderr"] for a in ra])) for m in ("acc", "acc_norm")
                }
                entry["random"]["accuracy"] = _accuracy_entry(pooled, acc_full)
            sel[label] = entry
        dres["keep"] = sel
        res["domains"][domain] = dres
        bar.set_postfix_str(f"{name} {domain}")
    res["pruned_params"] = {
        label: expert_parameter_counts(prune_model(model, random_subset(rc, len(model.blocks), k).layers))
        for label, k in keeps.items()
    }
    res["seconds_selection_eval"] = time.perf_counter() - t0
    return res


def _part_key(lm: LoadedModel, data: str | Path, cfg: ReportConfig) -> dict[str, Any]:
    """What a model's measurements depend on: its checkpoint file, the data and the configuration."""
    st = Path(lm.path).stat()
    return {"checkpoint": str(Path(lm.path).resolve()), "size": st.st_size, "mtime": st.st_mtime,
            "data": str(Path(data).resolve()), "config": asdict(cfg)}  # fmt: skip


def summarise(part: dict[str, Any], cols: Sequence[str]) -> dict[str, dict[str, float]]:
    """Mean relative rise over domains per keep fraction, ``{keep: {column: rise}}``, and with tasks the mean
    accuracy drop (acc_norm, points of 1) over the domains that have one, ``{keep: {"acc_drop/<column>": drop}}``."""
    out: dict[str, dict[str, float]] = {}
    domains = list(part["domains"].values())
    for label in domains[0]["keep"]:
        out[label] = {c: float(np.mean([d["keep"][label][c]["rise"] for d in domains])) for c in cols}
        for c in cols:
            drops = [
                d["keep"][label][c]["accuracy"]["drop"]
                for d in domains
                if d["keep"][label][c].get("accuracy")
            ]
            if drops:
                out[label][f"acc_drop/{c}"] = float(np.mean(drops))
    return out


def run_report(
    emo: str | Path,
    baseline: str | Path,
    data: str | Path,
    out: str | Path,
    cfg: ReportConfig,
    tokenizer: str | Path = "data/tokenizer.json",
    progress: bool = True,
    only: str | None = None,
) -> dict[str, Any]:
    """Run every measurement, write ``report.json``, ``report.md`` and the plots into ``out``.

    Each model's measurements are cached in ``out/part_<name>.json`` (reused while its checkpoint, the data
    and the configuration are unchanged). ``only="emo"`` (or ``"standard"``) measures and caches that model
    alone and writes no report (e.g. while the other model is still training).
    """
    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = DocumentTokenizer(tokenizer)
    docs = load_documents(data, tok)
    calib, evals = split_documents(docs, cfg.n_calib, cfg.n_eval, cfg.seed)
    short = {
        d: len(calib[d]) + len(evals[d]) for d in evals if not evals[d] or len(calib[d]) < max(cfg.shots)
    }
    if short:  # a rise needs evaluation documents, an s-shot subset s calibration documents of its own
        need = max(cfg.shots) + 1
        raise UserError(
            f"--data {data}: too few documents in {', '.join(f'{d} ({n})' for d, n in short.items())}: each "
            f"domain needs {need} ({max(cfg.shots)} to calibrate, at least 1 to evaluate)",
            "add documents, lower --shots / --calib-docs, or leave those domains out",
        )
    tasks = _Tasks.load(cfg.tasks, tok, calib) if cfg.tasks else None
    paths = {"emo": emo, "standard": baseline}
    if only is not None and only not in paths:
        raise ValueError(f"only must be 'emo' or 'standard', got {only!r}")
    models = {name: load_model(p) for name, p in paths.items() if only in (None, name)}
    n_keep = sum(
        1
        for k in cfg.keep
        if parse_keep(k, next(iter(models.values())).config.router)
        < next(iter(models.values())).config.router.num_experts
    )
    steps = len(models) * len(evals) * n_keep * (len(cfg.shots) * len(cfg.methods) + cfg.random_seeds)
    report: dict[str, Any] = {
        "config": asdict(cfg),
        "data": str(data),
        "domains": {d: {"calibration": [x.id for x in calib[d]], "eval_docs": len(evals[d])} for d in evals},
        "models": {},
    }
    all_eval = [d for group in evals.values() for d in group]
    with tqdm(total=steps, desc="report", unit="subset", disable=not progress) as bar:
        for name, lm in models.items():
            key = _part_key(lm, data, cfg)
            cache = out / f"part_{name}.json"
            if (
                cache.exists() and json.loads(cache.read_text()).get("key") == key
            ):  # same checkpoint and config
                report["models"][name] = json.loads(cache.read_text())["part"]
                bar.update(steps // len(models))
                continue
            part = _model_part(name, lm, calib, evals, cfg, tok.pad_id, bar, tasks)
            part["summary"] = summarise(part, columns(cfg))
            seq = min(cfg.seq_len, lm.config.arch.max_seq_len)
            feats, index, ids = router_features(
                lm.model, pack_documents(all_eval, seq, cfg.batch_size, tok.pad_id)
            )
            labels = np.asarray([all_eval[i].domain for i in index])
            part["clustering"] = cluster_tokens(
                feats, labels, cfg.clusters, max_tokens=cfg.cluster_tokens, seed=cfg.seed, token_ids=ids,
                decode=tok.decode,
            )  # fmt: skip
            atomic_write_text(cache, json.dumps({"key": key, "part": part}))
            report["models"][name] = part
    if only is not None:
        return report
    report["machine"] = {
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - start,
    }
    atomic_write_text(out / "report.json", json.dumps(report, indent=1))
    atomic_write_text(out / "report.md", markdown(report))
    plot(report, out)
    return report


def _pct(x: float, digits: int = 1) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:+.{digits}f}%"


def _accuracy_markdown(report: dict[str, Any], cols: Sequence[str], domains: Sequence[str]) -> list[str]:
    """Downstream accuracy: the full models' acc_norm per domain and every cut's drop (points), the paper's
    metric, beside the loss rise."""
    m = report["models"]
    lines = [
        "",
        "## Downstream accuracy (local tasks, acc_norm) and its drop",
        "",
        f"Tasks: `{report['config']['tasks']}` (items built from calibration documents left out). Drop = full "
        "model's accuracy - the cut's, in points (mean over the domains with a task); beside it the loss rise.",
        "",
        "| keep | "
        + " | ".join(f"EMO {_label(c)} drop / rise | std {_label(c)} drop / rise" for c in cols)
        + " |",
        "|---|" + "---|---|" * len(cols),
    ]
    for label, vals in m["emo"]["summary"].items():
        std = m["standard"]["summary"][label]

        def cell(v: dict[str, float], c: str) -> str:
            drop = v.get(f"acc_drop/{c}")
            return f"{'n/a' if drop is None else f'{100 * drop:+.1f}'} / {_pct(v[c], 2)}"

        lines.append(f"| {label} | " + " | ".join(f"{cell(vals, c)} | {cell(std, c)}" for c in cols) + " |")
    lines += ["", "| domain | items | EMO full acc | std full acc |", "|---|---|---|---|"]
    for d in domains:
        e, s = m["emo"]["domains"][d].get("accuracy"), m["standard"]["domains"][d].get("accuracy")
        if e and s:
            lines.append(
                f"| {d} | {e['n']} | {e['acc_norm']:.3f} ± {e['acc_norm_stderr']:.3f} | "
                f"{s['acc_norm']:.3f} ± {s['acc_norm_stderr']:.3f} |"
            )
    return lines


def _label(col: str) -> str:
    """``shots_8`` -> ``8-shot``; ``easy_ep_global_8`` -> ``easy_ep_global 8-shot``; ``random``."""
    if col == "random":
        return col
    method, _, shots = col.rpartition("_")
    return f"{shots}-shot" if method == "shots" else f"{method} {shots}-shot"


def markdown(report: dict[str, Any]) -> str:
    """The Markdown report: full-model losses, relative rises per keep fraction, accuracy, clustering."""
    cfg = report["config"]
    cols = columns(cfg)
    m = report["models"]
    domains = list(m["emo"]["domains"])
    n_experts = m["emo"]["router"]["num_experts"]
    methods = ", ".join(cfg.get("methods") or ["layerwise"])
    head = "| keep | experts | " + " | ".join(f"EMO {_label(c)} | std {_label(c)}" for c in cols) + " |"
    rule = "|---|---|" + "---|---|" * len(cols)
    lines = [
        "# Expert-subset report",
        "",
        f"Data: `{report['data']}`; {cfg['n_calib']} calibration and {cfg['n_eval']} evaluation documents per "
        f"domain (disjoint, seed {cfg['seed']}); selection ({methods}; n-shot = from the first n calibration "
        f"documents; layer-wise unless named); random = mean of {cfg['random_seeds']} random subsets. "
        "Rise = loss / full-model loss - 1.",
        "",
        "## Mean relative loss rise over the domains",
        "",
        head,
        rule,
    ]
    for label, vals in m["emo"]["summary"].items():
        std = m["standard"]["summary"][label]
        cells = " | ".join(f"{_pct(vals[c], 2)} | {_pct(std[c], 2)}" for c in cols)
        lines.append(f"| {label} | {m['emo']['keep_counts'][label]}/{n_experts} | {cells} |")
    if any(k.startswith("acc_drop/") for v in m["emo"]["summary"].values() for k in v):
        lines += _accuracy_markdown(report, cols, domains)
    lines += [
        "",
        "## Full models (all experts, no pool) per domain",
        "",
        "| domain | EMO loss | std loss | EMO vs std |",
        "|---|---|---|---|",
    ]
    for d in domains:
        e, s = m["emo"]["domains"][d]["full_loss"], m["standard"]["domains"][d]["full_loss"]
        lines.append(f"| {d} | {e:.4f} | {s:.4f} | {_pct(e / s - 1)} |")
    me = float(np.mean([m["emo"]["domains"][d]["full_loss"] for d in domains]))
    ms = float(np.mean([m["standard"]["domains"][d]["full_loss"] for d in domains]))
    lines.append(f"| **mean** | {me:.4f} | {ms:.4f} | {_pct(me / ms - 1, 2)} |")
    for label in m["emo"]["summary"]:
        if m["emo"]["keep_counts"][label] >= n_experts:
            continue
        lines += ["", f"## Keep {label} per domain (rise vs. the same model's full loss)", ""]
        lines += ["| domain | " + head.split("| experts | ", 1)[1], "|---|" + "---|---|" * len(cols)]
        for d in domains:
            ek, sk = m["emo"]["domains"][d]["keep"][label], m["standard"]["domains"][d]["keep"][label]
            cells = " | ".join(f"{_pct(ek[c]['rise'])} | {_pct(sk[c]['rise'])}" for c in cols)
            lines.append(f"| {d} | {cells} |")
    lines += ["", "## Causal document pools (inference mode)", ""]
    routing = m["emo"]["domains"][domains[0]]["causal_pool"]["routing"]
    lines += [
        f"Routing `{routing}`: each document's pool chosen from its first tokens only; loss on the targets after "
        "the prefix, vs. full routing on the same targets.",
        "",
        "| domain | EMO causal pool | EMO full | std causal pool | std full |",
        "|---|---|---|---|---|",
    ]
    for d in domains:
        ec, sc = m["emo"]["domains"][d]["causal_pool"], m["standard"]["domains"][d]["causal_pool"]
        lines.append(
            f"| {d} | {ec['loss']:.4f} | {ec['full_same_tokens']:.4f} | {sc['loss']:.4f} | {sc['full_same_tokens']:.4f} |"
        )
    lines += ["", "## Router clustering (per-token router probabilities of all layers)", ""]
    lines += [
        "| model | k | tokens | PCA dims | NMI vs domain | purity | majority baseline |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in m:
        c = m[name]["clustering"]
        lines.append(
            f"| {name} | {c['k']} | {c['tokens']} | {c['pca_dims']} | {c['nmi']:.3f} | {c['purity']:.3f} | {c['majority_baseline']:.3f} |"
        )
    for name in m:
        lines += [
            "",
            f"Largest {name} clusters: "
            + "; ".join(
                f"{c['majority']} {c['purity']:.0%} {' '.join(repr(t) for t in c.get('top_tokens', [])[:5])}"
                for c in m[name]["clustering"]["clusters"][:6]
            ),
        ]
    pe, pp = m["emo"]["params"], m["emo"]["pruned_params"]
    lines += ["", "## Size", "", "| keep | parameters | routed-expert parameters |", "|---|---|---|"]
    for label, p in pp.items():
        lines.append(
            f"| {label} | {p['total']:,} ({p['total'] / pe['total']:.0%}) | {p['routed_experts']:,} |"
        )
    secs = ", ".join(f"{n} {m[n]['seconds_selection_eval']:.0f} s" for n in m)
    lines += [
        "",
        f"Selection and evaluation time (wall): {secs}; this run {report['machine']['seconds']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


def plot(report: dict[str, Any], out: Path) -> None:
    """``loss_vs_keep.png`` (one panel per domain, both models) and ``mean_rise.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = report["models"]
    shots = report["config"]["shots"]
    domains = list(m["emo"]["domains"])
    labels = list(m["emo"]["summary"])
    xs = [float(x) for x in labels]
    styles = {"emo": "tab:blue", "standard": "tab:red"}
    cols = 4
    rows = math.ceil(len(domains) / cols)
    # one legend for all panels, below them (inside a panel it covered the curves)
    fig, axes = plt.subplots(
        rows, cols, figsize=(4 * cols, 3.2 * rows + 0.5), squeeze=False, sharex=True, layout="constrained"
    )
    for ax, d in zip(axes.flat, domains, strict=False):
        for name, color in styles.items():
            keep = m[name]["domains"][d]["keep"]
            for s, ls in zip(shots, ["-", "-."], strict=False):
                ax.plot(
                    xs,
                    [100 * keep[k][f"shots_{s}"]["rise"] for k in labels],
                    ls,
                    marker="o",
                    color=color,
                    label=f"{name} {s}-shot",
                    alpha=1.0 if s == shots[-1] else 0.6,
                )
            ax.plot(
                xs,
                [100 * keep[k]["random"]["rise"] for k in labels],
                ":",
                marker="x",
                color=color,
                label=f"{name} random",
            )
        ax.set_xscale("log", base=2)
        ax.set_title(d)
        ax.set_ylabel("loss rise (%)")
        ax.grid(alpha=0.3)
    for i, ax in enumerate(list(axes.flat)[: len(domains)]):
        if i + cols >= len(domains):  # the lowest panel of its column (the others share its x axis)
            ax.set_xlabel("kept fraction of experts")
    for ax in list(axes.flat)[len(domains) :]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=len(names), fontsize=8, frameon=False)
    fig.savefig(out / "loss_vs_keep.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7.5, 4), layout="constrained")
    for name, color in styles.items():
        summ = m[name]["summary"]
        for s, ls in zip(shots, ["-", "-."], strict=False):
            ax.plot(
                xs,
                [100 * summ[k][f"shots_{s}"] for k in labels],
                ls,
                marker="o",
                color=color,
                label=f"{name} {s}-shot",
            )
        ax.plot(
            xs,
            [100 * summ[k]["random"] for k in labels],
            ":",
            marker="x",
            color=color,
            label=f"{name} random",
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("kept fraction of experts")
    ax.set_ylabel("mean loss rise over domains (%)")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.margins(y=0.08)  # the largest rises' markers stay inside the axes
    low, high = ax.get_ylim()
    ticks = [t for t in (-20, -10, -5, -2, -1, -0.5, 0, 0.5, 1, 2, 5, 10, 20, 50, 100) if low <= t <= high]
    ax.set_yticks(ticks, [f"{t:g}" for t in ticks])  # plain percentages, not 10^1 / -10^0
    ax.grid(alpha=0.3)
    fig.legend(fontsize=8, loc="outside right upper", frameon=False)
    fig.savefig(out / "mean_rise.png", dpi=110)
    plt.close(fig)
