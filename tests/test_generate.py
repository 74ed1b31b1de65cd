"""``emo generate``: greedy decoding equals argmax over full forwards, batches equal one prompt at a time (greedy
and sampled), EOS stops a row, the command writes JSON Lines and refuses what it cannot do in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from emo_lightning.cli import main
from emo_lightning.generate import Sampling, generate
from emo_lightning.model import FULL, EMOTransformer, parse_routing, prune_model
from tests.experts.conftest import tiny_model, write_checkpoint

PROMPTS = [[5, 9, 33, 7], [100, 2, 8, 8, 301, 44, 12, 9, 3], [77]]


def _argmax_loop(model: EMOTransformer, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    for _ in range(n):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt) :].tolist()


@pytest.mark.parametrize("routing", ["full", "running:3", "subset"])
@torch.no_grad()
def test_greedy_equals_argmax_over_full_forwards(routing: str) -> None:
    model = tiny_model()
    if routing == "subset":
        model, routing = prune_model(model, [[0, 2, 5], [1, 3, 4], [0, 6, 7]]), "running:2"
    greedy = Sampling(max_new_tokens=10, temperature=0)
    with model.routing(parse_routing(routing)):
        for prompt in PROMPTS:
            ((tokens, finish),) = generate(model, [prompt], greedy, eos_id=-1)
            assert tokens == _argmax_loop(model, prompt, 10) and finish == "length"


@pytest.mark.parametrize(
    "sampling", [Sampling(12, temperature=0), Sampling(12, 0.8, top_k=50, top_p=0.9, seed=3)]
)
@torch.no_grad()
def test_a_batch_gives_the_same_text_as_one_prompt_at_a_time(sampling: Sampling) -> None:
    model = tiny_model()
    with model.routing(parse_routing("running:3")):
        batched = generate(model, PROMPTS, sampling, eos_id=-1)
        alone = [generate(model, [p], sampling, eos_id=-1, first_index=i)[0] for i, p in enumerate(PROMPTS)]
        assert batched == alone
        if sampling.temperature > 0:  # sampling is not greedy, and the seed matters
            assert batched != generate(model, PROMPTS, Sampling(12, temperature=0), eos_id=-1)
            other = Sampling(12, 0.8, top_k=50, top_p=0.9, seed=4)
            assert batched != generate(model, PROMPTS, other, eos_id=-1)


@torch.no_grad()
def test_eos_stops_a_row() -> None:
    model = tiny_model().eval()
    with model.routing(FULL):
        first = _argmax_loop(model, PROMPTS[0], 3)
        (tokens, finish), (other, _) = generate(
            model, PROMPTS[:2], Sampling(8, temperature=0), eos_id=first[2]
        )
        assert (tokens, finish) == (first[:2], "eos")  # the EOS itself is not part of the text
        assert len(other) == 8 or first[2] in _argmax_loop(model, PROMPTS[1], 8)


def test_the_command_writes_json_lines_and_refuses_in_one_line(tmp_path: Path, capsys) -> None:
    ckpt = str(write_checkpoint(tiny_model(), tmp_path / "m.ckpt"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def add(a, b):\nOnce upon a time <|endoftext|>\n")
    out = tmp_path / "out.jsonl"
    main(["generate", "--ckpt", ckpt, "--prompts", str(prompts), "--temperature", "0", "--max-new-tokens", "5",
          "--routing", "running:3", "--out", str(out)])  # fmt: skip
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["def add(a, b):", "Once upon a time <|endoftext|>"]
    assert all(len(r["tokens"]) <= 5 and r["finish"] in ("eos", "length") for r in records)
    assert "tokens/s" in capsys.readouterr().err
    std = str(write_checkpoint(tiny_model("standard"), tmp_path / "std.ckpt"))
    for argv, line in [
        (["--ckpt", std, "--prompt", "x", "--routing", "running:3"],
         "emo: --routing running:3: a standard-MoE model has no pools: use --routing full"),
        (["--ckpt", ckpt, "--prompt", "x", "--routing", "pool:3"], "emo: --routing pool:3: not causal: generate with full or running:P"),
        (["--ckpt", ckpt, "--prompt", "word " * 70, "--max-new-tokens", "5"], None),
        (["--ckpt", ckpt, "--prompt", "x", "--temperature", "-1"], "emo: --temperature -1.0: must be >= 0: 0 is greedy, 1 the model's own"),
    ]:  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            main(["generate", *argv])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1, err
        assert (line is None and "exceeds the model's max_seq_len 64" in err) or err == line + "\n"
