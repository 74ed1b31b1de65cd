"""build-tokenizer / build-shards: manifest, domain mixing, determinism, foreign tokenizers, CLI."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

from data_tools.build import build_shards
from data_tools.cli import main
from data_tools.errors import UserError
from data_tools.manifest import FORMAT_VERSION, Manifest
from data_tools.shards import token_dtype
from data_tools.tokenizer import file_sha256, load_tokenizer
from emo_lightning.data.shard_reader import read_shard


def test_manifest(shards: Path, corpus: tuple[list[Path], list[dict]], tokenizer_path: Path) -> None:
    m = Manifest.load(shards)
    raw = json.loads((shards / "manifest.json").read_text())
    assert raw["format_version"] == FORMAT_VERSION
    assert m.domains == {"code": 0, "literature": 1, "math": 2, "science": 3}
    assert m.tokenizer["sha256"] == file_sha256(tokenizer_path)
    assert (m.vocab_size, m.eos_id, m.pad_id, m.token_dtype) == (4096, 0, 1, "uint16")
    assert m.totals["docs"] == len(corpus[1]) == sum(s.docs for s in m.shards)
    assert (
        m.totals["tokens"]
        == sum(s.tokens for s in m.shards)
        == sum(d["tokens"] for d in m.per_domain.values())
    )
    for name, counts in m.per_domain.items():
        assert counts["docs"] == sum(r["domain"] == name for r in corpus[1])
        assert counts["tokens"] == sum(s.domains.get(name, {}).get("tokens", 0) for s in m.shards)
    assert m.skipped["total"] == 0 and len(m.shards) >= 16
    # Per-shard counts match the shard contents; keys are unique and documents end with EOS.
    keys = set()
    for info in m.shards:
        docs = list(read_shard(str(shards / info.name)))
        assert len(docs) == info.docs and sum(len(t) for _, t, _ in docs) == info.tokens
        assert all(t.dtype == np.uint16 and t[-1] == m.eos_id for _, t, _ in docs)
        keys.update(k for k, _, _ in docs)
    assert len(keys) == m.totals["docs"]


def test_shards_are_the_tars_tarfile_writes(shards: Path) -> None:
    """The writer frames members itself (for speed): its bytes are exactly those of ``tarfile.addfile``."""
    for info in Manifest.load(shards).shards[:3]:
        data = (shards / info.name).read_bytes()
        with tarfile.open(shards / info.name) as tar:
            members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, content in members:
                member = tarfile.TarInfo(name)
                member.size, member.mtime, member.mode = len(content), 0, 0o444
                tar.addfile(member, io.BytesIO(content))
        assert buf.getvalue() == data


def test_shards_mix_domains(shards: Path) -> None:
    """Input files hold one domain each: the seeded merge spreads every domain over the whole shard list."""
    m = Manifest.load(shards)
    order = [dom for info in m.shards for _, _, dom in read_shard(str(shards / info.name))]
    for domain in m.domains:
        pos = np.flatnonzero(np.array(order) == domain) / len(order)
        assert 0.3 < pos.mean() < 0.7, domain
    first_half = Counter(order[: len(order) // 2])
    assert set(first_half) == set(m.domains)


def test_deterministic_and_independent_of_workers(corpus, tokenizer_path: Path, tmp_path: Path) -> None:
    a = build_shards(corpus[0], tokenizer_path, tmp_path / "a", shard_size=4096, workers=1, quiet=True)
    b = build_shards(corpus[0], tokenizer_path, tmp_path / "b", shard_size=4096, workers=2, quiet=True)
    assert [s.name for s in a.manifest.shards] == [s.name for s in b.manifest.shards]
    for s in a.manifest.shards:
        assert (tmp_path / "a" / s.name).read_bytes() == (tmp_path / "b" / s.name).read_bytes()
    c = build_shards(corpus[0], tokenizer_path, tmp_path / "c", shard_size=4096, seed=1, quiet=True)
    assert c.manifest.per_domain == a.manifest.per_domain
    assert (tmp_path / "c" / "shard-000000.tar").read_bytes() != (
        tmp_path / "a" / "shard-000000.tar"
    ).read_bytes()
    with pytest.raises(UserError, match="already holds a shard set: pass --overwrite"):
        build_shards(corpus[0], tokenizer_path, tmp_path / "a", quiet=True)


def test_foreign_huggingface_tokenizer(corpus, tmp_path: Path) -> None:
    """A BERT-style tokenizer.json ([SEP]/[PAD], a post-processor adding [CLS]) works in place of ours."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    texts = [r["text"] for r in corpus[1]]
    tok.train_from_iterator(
        texts, trainers.WordPieceTrainer(vocab_size=800, special_tokens=["[UNK]", "[CLS]", "[SEP]", "[PAD]"])
    )
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)]
    )
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    m = build_shards(corpus[0], path, tmp_path / "shards", quiet=True).manifest
    assert (m.eos_id, m.pad_id) == (2, 3)
    assert m.tokenizer["eos_token"] == "[SEP]"
    docs = sorted(
        tuple(t.tolist()) for s in m.shards for _, t, _ in read_shard(str(tmp_path / "shards" / s.name))
    )
    want = sorted((*tok.encode(t, add_special_tokens=False).ids, 2) for t in texts)
    assert docs == want


def test_token_dtype() -> None:
    assert token_dtype(4096) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(200_000) == np.uint32


def test_cli_end_to_end(corpus, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tok = tmp_path / "tok.json"
    main(["build-tokenizer", "--input", *map(str, corpus[0]), "--vocab-size", "400", "--out", str(tok)])
    t = Tokenizer.from_file(str(tok))
    assert t.get_vocab_size() == 400
    assert (t.token_to_id("<|endoftext|>"), t.token_to_id("<|pad|>")) == (0, 1)
    out = tmp_path / "shards"
    main(
        [
            "build-shards",
            "--input",
            *map(str, corpus[0]),
            "--tokenizer",
            str(tok),
            "--out",
            str(out),
            "--shard-size",
            "8k",
            "--workers",
            "2",
            "--quiet",
        ]
    )
    m = Manifest.load(out)
    assert m.vocab_size == 400 and m.build["shard_size"] == 8192 and m.build["workers"] == 2
    with tarfile.open(out / m.shards[0].name) as tar:
        names = tar.getnames()
    assert {n.split(".", 1)[1] for n in names} == {"tokens.npy", "domain.txt", "id.txt"}
    main(["inspect", str(out)])
    assert "per_domain" in capsys.readouterr().out


def test_special_token_strings_in_text_are_text(tokenizer_path: Path, tmp_path: Path) -> None:
    """A document quoting ``<|endoftext|>`` and ``<|pad|>`` keeps them as text: the only EOS is the one the
    pipeline appends, and no PAD id appears (a false document end would split the document in training)."""
    text = "Hello <|endoftext|> world <|pad|> end."
    src = tmp_path / "web.jsonl"
    src.write_text(json.dumps({"id": "w", "domain": "web", "text": text}) + "\n")
    m = build_shards([src], tokenizer_path, tmp_path / "out", quiet=True).manifest
    ((_, array, _),) = read_shard(str(tmp_path / "out" / m.shards[0].name))
    tokens = array.tolist()
    assert tokens[-1] == m.eos_id and tokens.count(m.eos_id) == 1 and m.pad_id not in tokens
    tok = load_tokenizer(tokenizer_path)
    assert tok.decode(tokens[:-1]) == text  # the strings survive as ordinary characters
    assert tok.token_to_id("<|endoftext|>") == m.eos_id  # the token itself still exists for the pipeline


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (
            ["--input", "{tmp}/none.jsonl"],
            "emo-data: {tmp}/none.jsonl:0: unreadable_file: no such file: check the path",
        ),
        (
            ["--input", "{good}", "--tokenizer", "{good}"],
            "emo-data: {good}: not a tokenizer (expected `,` or `}}` at line 1 column 8): pass a Hugging Face "
            "tokenizer.json, e.g. data/tokenizer.json",
        ),
        (
            ["--input", "{good}", "--shard-size", "lots"],
            "emo-data: --shard-size 'lots': not a token count: use e.g. 65536, 64k, 1M or auto",
        ),
        (
            ["--input", "{good}", "--out", "{shards}"],
            "emo-data: {shards}: already holds a shard set: pass --overwrite to replace it",
        ),
        (
            ["--input", "{good}", "--eos-token", "</s>"],
            "emo-data: {tok}: tokenizer has no EOS token '</s>': pass --eos-token with one it has",
        ),
    ],
)
def test_cli_mistakes_end_in_one_line(
    argv: list[str],
    line: str,
    shards: Path,
    tokenizer_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text('{"text":"x"}\n')
    names = {"tmp": tmp_path, "good": good, "shards": shards, "tok": tokenizer_path}
    args = ["build-shards", "--tokenizer", str(tokenizer_path), "--out", str(tmp_path / "out"), "--quiet"]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, *(a.format(**names) for a in argv)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == line.format(**names) + "\n"


def test_inspect_of_an_empty_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", str(tmp_path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"emo-data: {tmp_path / 'manifest.json'}: no shard manifest: rebuild the shards with `emo-data "
        "build-shards` (or `make data`)\n"
    )
