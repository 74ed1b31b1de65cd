"""lm-eval adapter: exact log-likelihoods under any batching, the harness wiring end to end, subsets, errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from data_tools.tasks import TaskSpec, make_task
from emo_lightning.experts.cli import main
from emo_lightning.experts.documents import DocumentTokenizer
from emo_lightning.experts.harness import EMOHarnessLM
from emo_lightning.model import Routing
from tests.experts.conftest import TOKENIZER, WORDS, tiny_model, write_checkpoint


class _Req:
    """The part of lm-eval's ``Instance`` the adapter reads."""

    def __init__(self, *args: object) -> None:
        self.args = args


@pytest.fixture(scope="module")
def tok() -> DocumentTokenizer:
    return DocumentTokenizer(TOKENIZER)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("task")
    rng = random.Random(0)
    with open(root / "docs.jsonl", "w") as f:
        for domain in ("x", "y"):
            for i in range(6):
                text = " ".join(rng.choice(WORDS) for _ in range(24))
                f.write(json.dumps({"id": f"{domain}{i}", "domain": domain, "text": text}) + "\n")
    make_task([root / "docs.jsonl"], root / "tasks", TaskSpec(context_words=10, passage_words=5))
    return root / "tasks"


def _direct(model, tok: DocumentTokenizer, ctx: str, cont: str, routing: Routing) -> float:
    """log p(cont | ctx) from one unpadded forward: the tokens of ctx + cont after those of ctx."""
    whole = tok.tokenizer.encode(ctx + cont, add_special_tokens=False).ids
    n_ctx = len(tok.tokenizer.encode(ctx, add_special_tokens=False).ids)
    ids = torch.tensor([whole])
    with torch.no_grad(), model.routing(routing):
        logp = model(ids[:, :-1]).logits.log_softmax(-1)[0]  # (S-1,V)
    targets = ids[0, 1:]
    return float(logp[n_ctx - 1 :].gather(1, targets[n_ctx - 1 :, None]).sum())


@pytest.mark.parametrize("routing", [Routing(), Routing("pool", 3), Routing("running", 3)])
def test_loglikelihood_is_exact_under_any_batching(tok: DocumentTokenizer, routing: Routing) -> None:
    model = tiny_model()
    rng = random.Random(1)
    pairs = [
        (" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20))), " " + rng.choice(WORDS) + " " + rng.choice(WORDS))
        for _ in range(7)
    ]  # fmt: skip
    one = EMOHarnessLM(model, tok, routing, batch_size=1, progress=False)
    many = EMOHarnessLM(model, tok, routing, batch_size=7, progress=False)  # padded rows of other lengths
    a = one.loglikelihood([_Req(*p) for p in pairs], disable_tqdm=True)
    b = many.loglikelihood([_Req(*p) for p in pairs], disable_tqdm=True)
    for (ctx, cont), (lp1, _), (lp7, _) in zip(pairs, a, b, strict=True):
        assert lp1 == pytest.approx(_direct(model, tok, ctx, cont, routing), abs=1e-4)
        assert lp7 == pytest.approx(lp1, abs=1e-4)  # padding is its own segment: never in a pool


def test_greedy_flag_and_rolling(tok: DocumentTokenizer) -> None:
    model = tiny_model()
    lm = EMOHarnessLM(model, tok, progress=False)
    ctx = "alpha beta gamma"
    ids = tok.tokenizer.encode(ctx, add_special_tokens=False).ids
    with torch.no_grad(), model.routing(Routing()):
        nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
    greedy = lm._loglikelihood_tokens([(None, ids, [nxt])])[0]
    other = lm._loglikelihood_tokens([(None, ids, [(nxt + 1) % 4000 + 2])])[0]
    assert greedy[1] and not other[1]
    text = "delta epsilon zeta eta"
    toks = tok.tokenizer.encode(text, add_special_tokens=False).ids
    rolling = lm.loglikelihood_rolling([_Req(text)], disable_tqdm=True)[0]
    whole = lm._loglikelihood_tokens([(None, [tok.eos_id], toks)])[0][0]  # short: one window, EOS prefix
    assert rolling == pytest.approx(whole, abs=1e-5)


def test_generate_until_is_greedy_decoding_cut_at_the_stop(tok: DocumentTokenizer) -> None:
    from emo_lightning.generate import Sampling, generate

    model = tiny_model()
    lm = EMOHarnessLM(model, tok, progress=False)
    ids = tok.tokenizer.encode("alpha beta", add_special_tokens=False).ids
    with model.routing(Routing()):
        ((tokens, _),) = generate(model, [ids], Sampling(max_new_tokens=6, temperature=0), tok.eos_id)
    text = tok.decode(tokens)
    assert lm.generate_until([_Req("alpha beta", {"max_gen_toks": 6, "until": []})], True) == [text]
    stop = text[len(text) // 2 :] or "never"
    assert lm.generate_until([_Req("alpha beta", {"max_gen_toks": 6, "until": [stop]})], True) == [
        text[: text.index(stop)]
    ]


def test_eval_tasks_end_to_end_matches_a_recount(
    tmp_path: Path, task_dir: Path, tok: DocumentTokenizer
) -> None:
    model = tiny_model()
    ckpt = write_checkpoint(model, tmp_path / "m.ckpt")
    main(["eval", "--ckpt", str(ckpt), "--tasks", str(task_dir), "--out", str(tmp_path / "acc.json"),
          "--tokenizer", str(TOKENIZER), "--no-progress"])  # fmt: skip
    res = json.loads((tmp_path / "acc.json").read_text())["results"]
    assert set(res) == {"nextpassage_x", "nextpassage_y", "all"}
    lm = EMOHarnessLM(model, tok, progress=False)
    for task in ("nextpassage_x", "nextpassage_y"):
        items = [json.loads(line) for line in (task_dir / f"{task}.jsonl").read_text().splitlines()]
        hits = []
        for it in items:  # the harness scores " " + choice after the context
            scores = [
                s for s, _ in lm.loglikelihood([_Req(it["context"], " " + c) for c in it["choices"]], True)
            ]
            hits.append(max(range(len(scores)), key=scores.__getitem__) == it["label"])
        assert res[task]["acc"] == pytest.approx(sum(hits) / len(hits))
        assert res[task]["n"] == len(items) and res[task]["domain"] == task[-1]
        assert res[task]["acc_stderr"] > 0 and res[task]["acc_norm"] is not None
    assert res["all"]["n"] == res["nextpassage_x"]["n"] + res["nextpassage_y"]["n"]


def test_eval_tasks_with_subsets_and_errors(tmp_path: Path, task_dir: Path, capsys) -> None:
    ckpt = write_checkpoint(tiny_model(), tmp_path / "m.ckpt")
    variable = {"format": "emo-expert-subset", "method": "easy_ep", "keep": 3, "num_experts": 9,
                "num_shared": 1, "layers": [[0], [1, 2, 3], [4, 5]]}  # fmt: skip
    (tmp_path / "v.json").write_text(json.dumps(variable))
    base = ["eval", "--ckpt", str(ckpt), "--tokenizer", str(TOKENIZER), "--no-progress"]
    main(
        [
            *base,
            "--tasks",
            str(task_dir),
            "--subset",
            str(tmp_path / "v.json"),
            "--out",
            str(tmp_path / "v.out"),
        ]
    )
    out = json.loads((tmp_path / "v.out").read_text())
    assert out["experts_per_layer"] == [1, 3, 2] and out["results"]["all"]["n"] == 12
    for args, message in (
        (["--tasks", "no_such_task_anywhere"], "unknown task"),
        (["--tasks", str(tmp_path)], "no lm-eval task YAML"),
        (["--tasks", str(task_dir), "--routing", "causal:2:4"], "causal"),
    ):
        with pytest.raises(SystemExit) as err:
            main([*base, *args])
        assert err.value.code == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith("emo-experts: ") and message in line
    with pytest.raises(SystemExit):  # a variable keep cannot be pruned into one model
        main(
            ["prune", "--ckpt", str(ckpt), "--subset", str(tmp_path / "v.json"), "--out", str(tmp_path / "p")]
        )
    assert "variable keep per layer" in capsys.readouterr().err
