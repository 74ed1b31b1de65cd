"""Training and loading tokenizers (any Hugging Face ``tokenizer.json`` works; special tokens detected).

User text is text: a loaded tokenizer encodes special-token strings that occur in a document (a web page quoting
``<|endoftext|>``) as ordinary characters, never as the EOS or PAD id. Only the pipeline adds an EOS, after each
document.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data_tools.errors import UserError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
EOS_CANDIDATES = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[SEP]", "<|im_end|>")
TOKENIZER_FIX = "pass a Hugging Face tokenizer.json, e.g. data/tokenizer.json"
PAD_CANDIDATES = (PAD_TOKEN, "<pad>", "[PAD]", "<|padding|>", "<|finetune_right_pad_id|>")


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style) with ``EOS_TOKEN`` (id 0) and ``PAD_TOKEN`` (id 1)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a Hugging Face ``tokenizer.json`` that encodes special-token strings in text as text."""
    fix = TOKENIZER_FIX
    if not Path(path).is_file():
        raise UserError(f"{path}: no such tokenizer file", fix)
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for parse errors
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{path}: not a tokenizer ({reason})", fix) from err
    tokenizer.encode_special_tokens = True  # "<|endoftext|>" inside a document is text, not the EOS id
    return tokenizer


def load_tokenizer_json(text: str, source: str) -> Tokenizer:
    """:func:`load_tokenizer` from the JSON text of a ``tokenizer.json`` (``source`` names it in errors)."""
    try:
        tokenizer = Tokenizer.from_str(text)
    except Exception as err:  # tokenizers raises a bare Exception for parse errors
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{source}: not a tokenizer ({reason})", TOKENIZER_FIX) from err
    tokenizer.encode_special_tokens = True
    return tokenizer


def special_ids(
    tokenizer: Tokenizer, eos_token: str | None = None, pad_token: str | None = None, source: str = ""
) -> tuple[str, int, str, int]:
    """``(eos_token, eos_id, pad_token, pad_id)``: given names, else the first known candidate present.

    A tokenizer without a PAD token pads with EOS (padding is always masked by labels and domain ids).
    """

    def find(name: str | None, candidates: tuple[str, ...], what: str) -> tuple[str, int] | None:
        for cand in (name,) if name else candidates:
            idx = tokenizer.token_to_id(cand)
            if idx is not None:
                return cand, idx
        if name:
            raise UserError(
                f"{source}: tokenizer has no {what} token {name!r}",
                f"pass --{what.lower()}-token with one it has",
            )
        return None

    eos = find(eos_token, EOS_CANDIDATES, "EOS")
    if eos is None:
        raise UserError(
            f"{source}: tokenizer has none of the usual EOS tokens {EOS_CANDIDATES}", "pass --eos-token NAME"
        )
    pad = find(pad_token, PAD_CANDIDATES, "PAD") or eos
    return eos[0], eos[1], pad[0], pad[1]


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
