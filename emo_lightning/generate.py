"""``emo generate``: text from a checkpoint (full, pruned or consolidated) with a KV cache.

Routing: ``full`` (every token over all experts) or ``running:P`` (each token's pool of P experts chosen from its
document's tokens so far: the routing a model trained with ``pool_scope: running`` uses, and the leak-free one
for any EMO model). A prompt is the beginning of a document: its special-token strings are text, and no EOS is
added. Decoding stops at the EOS or after ``--max-new-tokens``. Sampling draws from one random stream per prompt
(seeded by ``--seed`` and the prompt's index), so a batch gives the same text as one prompt at a time.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import Tensor

from emo_lightning.checkpoint import load_model
from emo_lightning.errors import ArgumentParser, UserError
from emo_lightning.experts.documents import DEFAULT_TOKENIZER, DocumentTokenizer
from emo_lightning.experts.selection import Subset
from emo_lightning.model import DecodeCache, EMOTransformer, Routing, derive_seed, parse_routing, prune_model

_SAMPLE_STREAM = 0x5A3F1E


@dataclass
class Sampling:
    """Decoding options: ``temperature`` 0 is greedy; ``top_k`` / ``top_p`` (None: off) filter the sampled
    distribution."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(
                f"--max-new-tokens {self.max_new_tokens}: must be >= 1", "ask for at least one token"
            )
        if self.temperature < 0:
            raise UserError(
                f"--temperature {self.temperature}: must be >= 0", "0 is greedy, 1 the model's own"
            )
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"--top-k {self.top_k}: must be >= 1", "leave it out to sample from every token")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UserError(f"--top-p {self.top_p}: must lie in (0, 1]", "e.g. 0.9")


def _filter(logits: Tensor, sampling: Sampling) -> Tensor:
    """Temperature, top-k and top-p applied to ``logits`` (B,V) -> probabilities (B,V) fp32."""
    logits = logits.float() / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[:, -1:]  # (B,1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if sampling.top_p is not None and sampling.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)  # (B,V)
        drop = sorted_p.cumsum(-1) - sorted_p > sampling.top_p  # keep the smallest prefix reaching top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def next_tokens(logits: Tensor, sampling: Sampling, uniforms: Tensor) -> Tensor:
    """(B,V) logits -> (B,) tokens: argmax at temperature 0, else inverse-CDF sampling with ``uniforms`` (B,)."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    cdf = _filter(logits, sampling).cumsum(-1)  # (B,V)
    u = uniforms.to(cdf.device, cdf.dtype).unsqueeze(-1) * cdf[:, -1:]  # (B,1)
    return torch.searchsorted(cdf, u).squeeze(-1).clamp_max(cdf.shape[-1] - 1)


@torch.no_grad()
def generate(
    model: EMOTransformer,
    prompts: Sequence[Sequence[int]],
    sampling: Sampling,
    eos_id: int,
    first_index: int = 0,
    on_token: Callable[[int, int], None] | None = None,
    allowed: Tensor | None = None,
) -> list[tuple[list[int], str]]:
    """Continue every prompt (a batch, each row on its own); returns ``(tokens, "eos" | "length")`` per prompt.

    ``first_index``: index of ``prompts[0]`` in the whole input (seeds its random stream). ``on_token(row,
    token)`` is called for every generated token (streaming). ``allowed``: (L,1,1,E') the experts every token may
    use (a variable-keep subset on the full model), passed to every forward.
    """
    device = model.lm_head.weight.device
    b, longest = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros(b, longest, dtype=torch.long)
    doc = torch.ones(b, longest, dtype=torch.long)  # padding is its own segment after the document
    for i, p in enumerate(prompts):
        ids[i, : len(p)], doc[i, : len(p)] = torch.as_tensor(p), 0
    lengths = torch.tensor([len(p) for p in prompts])
    cache = DecodeCache.empty(
        model.cfg, b, longest + sampling.max_new_tokens, device, model.lm_head.weight.dtype
    )
    logits = model(ids.to(device), doc.to(device), cache=cache, allowed=allowed).logits[
        torch.arange(b), lengths - 1
    ]  # (B,V)
    gens = [
        torch.Generator().manual_seed(derive_seed(sampling.seed, first_index + i, _SAMPLE_STREAM))
        for i in range(b)
    ]
    out: list[list[int]] = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool)
    for step in range(sampling.max_new_tokens):
        uniforms = torch.cat([torch.rand(1, generator=g) for g in gens])  # (B,) one stream per prompt
        tokens = next_tokens(logits, sampling, uniforms).cpu()  # (B,)
        for row in (~done).nonzero().flatten().tolist():
            if int(tokens[row]) == eos_id:
                done[row] = True
            else:
                out[row].append(int(tokens[row]))
                if on_token is not None:
                    on_token(row, int(tokens[row]))
        if bool(done.all()) or step == sampling.max_new_tokens - 1:
            break
        logits = model(tokens.to(device)[:, None], cache=cache, allowed=allowed).logits[:, -1]  # (B,V)
    return [(toks, "eos" if d else "length") for toks, d in zip(out, done.tolist(), strict=True)]


class TextStream:
    """Prints a token stream as text as soon as the bytes form whole characters (byte-level BPE)."""

    def __init__(self, tokenizer: DocumentTokenizer, file: TextIO) -> None:
        self.tokenizer, self.file, self.tokens, self.printed = tokenizer, file, [], ""

    def __call__(self, _row: int, token: int) -> None:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if not text.endswith("\ufffd"):  # an incomplete UTF-8 sequence waits for its next token
            self.file.write(text[len(self.printed) :])
            self.file.flush()
            self.printed = text


def _batches(items: list[Any], size: int) -> Iterator[tuple[int, list[Any]]]:
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


def _read_prompts(path: str) -> list[str]:
    """A text file (one prompt per line) or JSON Lines with a ``prompt`` (or ``text``) field."""
    try:
        lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except FileNotFoundError:
        raise UserError(
            f"--prompts {path}: no such file", "one prompt per line, or JSON Lines with 'prompt'"
        ) from None
    if not lines:
        raise UserError(f"--prompts {path}: no prompts in the file", "one prompt per line")
    if not lines[0].lstrip().startswith("{"):
        return lines
    prompts = []
    for n, line in enumerate(lines, 1):
        record = json.loads(line)
        text = record.get("prompt", record.get("text"))
        if not isinstance(text, str):
            raise UserError(f"{path}:{n}: no 'prompt' (or 'text') string", "give every record a prompt")
        prompts.append(text)
    return prompts


def load_generator(ckpt: str, subset: str | None, routing: Routing, device: torch.device) -> EMOTransformer:
    """The checkpoint's model (cut to ``subset``) on ``device``, in eval mode; routing is set by the caller."""
    lm = load_model(ckpt)
    model = lm.model
    if subset:
        path = Path(subset)
        if not path.is_file():
            raise UserError(
                f"--subset {subset}: no such file", "pass a subset.json from `emo-experts select`"
            )
        rc = model.cfg.router
        chosen = Subset.from_dict(json.loads(path.read_text()), subset)
        if (chosen.num_experts, chosen.num_shared) != (rc.num_experts, rc.num_shared):
            raise UserError(
                f"--subset {subset}: selected for {chosen.num_experts} experts, the checkpoint has {rc.num_experts}",
                "select the subset from this checkpoint",
            )
        model = prune_model(model, chosen.layers)
    if routing.kind not in ("full", "running"):
        raise UserError(f"--routing {routing}: not causal", "generate with full or running:P")
    if routing.kind == "running" and model.cfg.router.kind != "emo":
        raise UserError(f"--routing {routing}: a standard-MoE model has no pools", "use --routing full")
    return model.to(device).eval()


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="emo generate", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="checkpoint: trained, pruned or consolidated DeepSpeed")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt (streamed to stdout)")
    src.add_argument("--prompts", help="a file: one prompt per line, or JSON Lines with a 'prompt' field")
    p.add_argument("--subset", default=None, help="generate with the checkpoint cut to this subset.json")
    p.add_argument("--routing", type=parse_routing, default=Routing(), help="full (default) or running:P")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--batch-size", type=int, default=8, help="prompts decoded together (default: %(default)s)"
    )
    p.add_argument(
        "--tokenizer", default=DEFAULT_TOKENIZER, help="the run's tokenizer.json (default: %(default)s)"
    )
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--out", default=None, help="write JSON Lines (prompt, completion, tokens, finish) here")
    return p


def main(argv: list[str]) -> None:
    """``emo generate ...`` (user errors raise :class:`UserError`; the caller prints them)."""
    args = build_parser().parse_args(argv)
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be >= 1", "e.g. 8")
    device = torch.device(
        "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    )
    model = load_generator(args.ckpt, args.subset, args.routing, device)
    tok = DocumentTokenizer(args.tokenizer)
    if tok.vocab_size > model.cfg.arch.vocab_size:
        raise UserError(
            f"--tokenizer {args.tokenizer}: vocabulary larger than the model's", "pass the run's tokenizer"
        )
    texts = [args.prompt] if args.prompt is not None else _read_prompts(args.prompts)
    prompts = [tok.tokenizer.encode(t).ids for t in texts]
    limit = model.cfg.arch.max_seq_len
    for text, ids in zip(texts, prompts, strict=True):
        if not ids:
            raise UserError("empty prompt", "give every prompt some text")
        if len(ids) + sampling.max_new_tokens > limit:
            raise UserError(
                f"prompt of {len(ids)} tokens + --max-new-tokens {sampling.max_new_tokens} exceeds the model's "
                f"max_seq_len {limit} ({text[:40]!r}...)",
                "shorten the prompt or lower --max-new-tokens",
            )
    out = open(args.out, "w", encoding="utf-8") if args.out else None  # noqa: SIM115 (closed below)
    stream = args.prompt is not None and out is None
    start, n_tokens = time.perf_counter(), 0
    try:
        with model.routing(args.routing):
            for first, batch in _batches(prompts, args.batch_size):
                on_token = TextStream(tok, sys.stdout) if stream else None
                results = generate(model, batch, sampling, tok.eos_id, first, on_token)
                for i, (tokens, finish) in enumerate(results):
                    n_tokens += len(tokens)
                    text = tok.decode(tokens)
                    if out is not None:
                        record = {
                            "prompt": texts[first + i],
                            "completion": text,
                            "tokens": tokens,
                            "finish": finish,
                        }
                        out.write(json.dumps(record, ensure_ascii=False) + "\n")
                    elif not stream:
                        print(
                            json.dumps({"prompt": texts[first + i], "completion": text}, ensure_ascii=False)
                        )
                if stream:
                    print(flush=True)
    finally:
        if out is not None:
            out.close()
    seconds = time.perf_counter() - start
    print(
        f"generated {n_tokens} tokens for {len(prompts)} prompt(s) in {seconds:.1f} s "
        f"({n_tokens / max(seconds, 1e-9):.1f} tokens/s, {device}, routing {args.routing})",
        file=sys.stderr,
    )
