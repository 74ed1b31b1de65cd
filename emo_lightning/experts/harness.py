"""Downstream tasks through lm-evaluation-harness (PyPI ``lm-eval``, the harness OLMES builds on), in process.

The adapter, :class:`EMOHarnessLM`, subclasses the harness's ``TemplateLM`` (its base for token-level models:
it splits every (context, continuation) pair into tokens, moves trailing context spaces into the continuation
and handles empty contexts) and scores with our own :class:`EMOTransformer`. Why not the harness's ``hf``
adapter on an ``emo-experts export`` folder: the export routes every token over all of its experts, one
document per row, so it cannot evaluate what this toolkit measures — a variable keep per layer (``allowed``
masks), EMO pools (``running:P``, ``pool:P``) — and it would add an export round trip and a second forward
implementation to every evaluation. In process, a full, pruned or subset model is scored by exactly the forward
that ``emo-experts eval`` uses for losses.

* ``loglikelihood``: one row per (context, continuation), left-truncated to ``max_seq_len`` + 1 tokens, rows of
  similar length batched together; padding is its own segment after the document (``doc_ids`` 1), so it never
  enters a document pool. Only the continuation's log-probabilities are gathered (no (B,S,V) log-softmax).
* ``loglikelihood_rolling``: the harness's disjoint rolling windows of ``max_seq_len`` tokens (EOS prefix).
* ``generate_until``: :func:`emo_lightning.generate.generate` (KV cache; greedy unless the task samples), cut at
  the first stop string. Needs ``full`` or ``running:P`` routing (document pools look ahead).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string
from torch import Tensor
from tqdm.auto import tqdm

from emo_lightning.errors import UserError
from emo_lightning.experts.documents import DEFAULT_TOKENIZER, DocumentTokenizer
from emo_lightning.model import FULL, EMOTransformer, Routing, parse_routing

TASK_FIX = "generate a local task with `emo-data make-task --input DOCS --out DIR`, then pass --tasks DIR"


@register_model("emo")
class EMOHarnessLM(TemplateLM):
    """An ``EMOTransformer`` (full, pruned, or with a variable-keep ``allowed`` mask) as an lm-eval model.

    ``lm_eval --model emo --model_args ckpt=CKPT,subset=S.json,routing=running:8`` works too once this module is
    imported (``create_from_arg_string``).
    """

    def __init__(
        self,
        model: EMOTransformer,
        tokenizer: DocumentTokenizer,
        routing: Routing = FULL,
        allowed: Tensor | None = None,
        batch_size: int = 32,
        progress: bool = True,
    ) -> None:
        super().__init__()
        if routing.kind == "causal":
            raise UserError("--routing causal:P:N with --tasks", "use full, pool:P or running:P")
        self.model, self.tok, self.routing, self.allowed = model, tokenizer, routing, allowed
        self.batch_size, self.progress = batch_size, progress
        self.max_length = model.cfg.arch.max_seq_len
        self.device_ = model.lm_head.weight.device

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> EMOHarnessLM:
        """``ckpt=...,subset=...,routing=...,tokenizer=...,batch_size=...`` (the lm-eval command line)."""
        from emo_lightning.checkpoint import load_model
        from emo_lightning.experts.selection import Subset

        args = {**simple_parse_args_string(arg_string), **(additional_config or {})}
        lm = load_model(args["ckpt"])
        model, allowed = lm.model, None
        if args.get("subset"):
            import json

            model, allowed = Subset.from_dict(json.loads(Path(args["subset"]).read_text())).apply(model)
        tok = DocumentTokenizer(args.get("tokenizer", DEFAULT_TOKENIZER))
        routing = parse_routing(str(args.get("routing", "full")))
        return cls(model, tok, routing, allowed, int(args.get("batch_size") or 32))

    # ------------------------------------------------------------------ TemplateLM
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tok.tokenizer.encode(string, add_special_tokens=False).ids

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tok.decode(tokens)

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """The harness's tokenisation (``TemplateLM``), then :meth:`_loglikelihood_tokens`; quiet without progress."""
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    def _forward(self, ids: Tensor, doc_ids: Tensor) -> Tensor:
        """(B,S) -> (B,S,V) logits under the routing and subset."""
        with torch.no_grad(), self.model.routing(self.routing):
            return self.model(ids.to(self.device_), doc_ids.to(self.device_), allowed=self.allowed).logits

    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """Summed log p(continuation | context) and whether greedy decoding reproduces it, per request."""
        rows = []
        for _, ctx, cont in requests:
            seq = (ctx + cont)[-(self.max_length + 1) :]
            rows.append((seq, min(len(cont), len(seq) - 1)))  # (tokens, continuation tokens scored)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths batch together
        results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for batch in tqdm(
            batches, desc="loglikelihood", disable=disable_tqdm or not self.progress, leave=False
        ):
            width = len(rows[batch[0]][0]) - 1
            ids = torch.full((len(batch), width), self.tok.pad_id, dtype=torch.long)  # (B,S)
            doc_ids = torch.ones(len(batch), width, dtype=torch.long)  # padding: its own segment
            target = torch.zeros(len(batch), width, dtype=torch.long)  # (B,S) next tokens
            scored = torch.zeros(len(batch), width, dtype=torch.bool)  # (B,S) continuation positions
            for r, i in enumerate(batch):
                seq, n = rows[i]
                t = torch.as_tensor(seq, dtype=torch.long)
                ids[r, : len(seq) - 1], doc_ids[r, : len(seq) - 1] = t[:-1], 0
                target[r, : len(seq) - 1] = t[1:]
                scored[r, len(seq) - 1 - n : len(seq) - 1] = True
            logits = self._forward(ids, doc_ids)  # (B,S,V)
            mask = scored.to(logits.device)
            picked = logits[mask].float()  # (M,V) the continuation's positions only
            tgt = target.to(logits.device)[mask]  # (M,)
            logp = picked.log_softmax(-1).gather(1, tgt[:, None]).squeeze(1).double()  # (M,)
            row = mask.nonzero()[:, 0]  # (M,) the row of every scored position
            total = torch.zeros(len(batch), dtype=torch.float64, device=logp.device).index_add_(0, row, logp)
            wrong = torch.zeros(len(batch), dtype=torch.long, device=logp.device).index_add_(
                0, row, (picked.argmax(-1) != tgt).long()
            )
            for r, i in enumerate(batch):
                results[i] = (float(total[r]), bool(wrong[r] == 0))
        for (req, _, _), res in zip(requests, results, strict=True):
            if req is not None:
                self.cache_hook.add_partial("loglikelihood", req, res)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole strings: disjoint rolling windows of ``max_seq_len`` tokens, summed."""
        windows, owner = [], []
        for i, req in enumerate(requests):
            (string,) = req.args
            for ctx, cont in map(
                make_disjoint_window,
                get_rolling_token_windows(self.tok_encode(string), self.eot_token_id, self.max_length, 1),
            ):
                windows.append((None, ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, scores, strict=True):
            totals[i] += lp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or the task's sampling) continuation of every context, cut at its first stop string."""
        from emo_lightning.generate import Sampling, generate

        if self.routing.kind == "pool":
            raise UserError(
                "--routing pool:P: document pools look ahead and cannot generate",
                "use --routing running:P or full for generative tasks",
            )
        out: list[str] = []
        for req in tqdm(requests, desc="generate", disable=disable_tqdm or not self.progress, leave=False):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            new = min(int(kwargs.get("max_gen_toks", 256)), self.max_length - 1)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            prompt = (self.tok_encode(context) or [self.eot_token_id])[-(self.max_length - new) :]
            sampling = Sampling(max_new_tokens=new, temperature=temperature)
            with self.model.routing(self.routing):
                ((tokens, _),) = generate(
                    self.model, [prompt], sampling, self.eot_token_id, allowed=self.allowed
                )
            text = self.tok_decode(tokens)
            cuts = [text.index(s) for s in until if s and s in text]
            out.append(text[: min(cuts)] if cuts else text)
            self.cache_hook.add_partial("generate_until", (context, req.args[1]), out[-1])
        return out


def _task_configs(folder: Path) -> dict[str, dict[str, Any]]:
    """Every task (not group) defined by a YAML file of ``folder``: ``{name: config}``."""
    configs = {}
    for path in sorted(folder.rglob("*.yaml")):
        try:
            config = yaml.safe_load(path.read_text())
        except yaml.YAMLError:
            continue  # tags like !function: not a task this toolkit generated; the harness reads it anyway
        if isinstance(config, dict) and isinstance(config.get("task"), str):
            configs[config["task"]] = config
    return configs


def resolve_tasks(spec: str) -> tuple[list[str], Path | None]:
    """``--tasks``: a folder (every task defined in it) or comma-separated names -> (names, folder)."""
    path = Path(spec)
    if path.is_dir():
        names = sorted(_task_configs(path))
        if not names:
            raise UserError(f"--tasks {spec}: no lm-eval task YAML in this folder", TASK_FIX)
        return names, path
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise UserError(f"--tasks {spec!r}: no task names", TASK_FIX)
    return names, None


def task_documents(folder: Path) -> dict[str, dict[str, Any]]:
    """For a ``make-task`` folder: ``{task: {"domain", "doc_ids"}}``, the source document of every item in order
    (e.g. to leave out items built from calibration documents)."""
    import json

    out = {}
    for name, config in _task_configs(folder).items():
        data = (config.get("dataset_kwargs") or {}).get("data_files", {}).get("test")
        if not data or not Path(data).is_file():
            continue
        with open(data, encoding="utf-8") as f:
            ids = [json.loads(line)["doc_id"] for line in f if line.strip()]
        out[name] = {"domain": (config.get("metadata") or {}).get("domain"), "doc_ids": ids}
    return out


def run_tasks(
    lm: EMOHarnessLM,
    names: Sequence[str],
    folder: Path | None = None,
    samples: dict[str, list[int]] | None = None,
    limit: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Evaluate ``names`` (tasks of ``folder``, or the harness's own) -> ``{task: {acc, acc_stderr, acc_norm,
    acc_norm_stderr, n, domain}}`` plus ``"all"`` (item-weighted over the tasks). ``samples``: item indices per
    task (the harness's ``samples``)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # no hub here: fail fast instead of retrying
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(folder) if folder else None, include_defaults=folder is None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise UserError(f"--tasks: unknown task {unknown[0]!r}", TASK_FIX)
    try:
        res = simple_evaluate(
            model=lm, tasks=list(names), task_manager=manager, samples=samples, limit=limit,
            log_samples=False, bootstrap_iters=1000, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
        )  # fmt: skip
    except (ConnectionError, OSError) as err:
        raise UserError(f"--tasks: a task's dataset is not available offline ({err})", TASK_FIX) from None
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        r = res["results"][name]
        row = {m: r.get(f"{m},none") for m in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")}
        row["n"] = int(res["n-samples"][name]["effective"])
        row["domain"] = (res["configs"][name].get("metadata") or {}).get("domain")
        out[name] = row
    out["all"] = _pooled([out[n] for n in names])
    return out


def _pooled(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Item-weighted accuracy over tasks and its standard error (independent tasks)."""
    n = sum(r["n"] for r in rows)
    pooled: dict[str, Any] = {"n": n, "domain": None}
    for m in ("acc", "acc_norm"):
        if any(r[m] is None for r in rows) or n == 0:
            pooled[m] = pooled[f"{m}_stderr"] = None
            continue
        pooled[m] = sum(r[m] * r["n"] for r in rows) / n
        pooled[f"{m}_stderr"] = sum((r[f"{m}_stderr"] or 0.0) ** 2 * r["n"] ** 2 for r in rows) ** 0.5 / n
    return pooled


def format_accuracy(results: dict[str, dict[str, Any]]) -> str:
    """A plain-text table: task, items, acc +- stderr, acc_norm +- stderr."""
    head = f"{'task':<34}{'items':>7}{'acc':>18}{'acc_norm':>18}"
    lines = [head, "-" * len(head)]

    def cell(row: dict[str, Any], m: str) -> str:
        return "n/a" if row[m] is None else f"{row[m]:.4f} ± {row[f'{m}_stderr'] or 0:.4f}"

    for name, row in results.items():
        lines.append(f"{name:<34}{row['n']:>7}{cell(row, 'acc'):>18}{cell(row, 'acc_norm'):>18}")
    return "\n".join(lines)
