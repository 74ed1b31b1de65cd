"""Training and loading tokenizers (any Hugging Face ``tokenizer.json`` works; special tokens detected)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
EOS_CANDIDATES = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[SEP]", "<|im_end|>")
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
    """Load a Hugging Face ``tokenizer.json``; errors name the file."""
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for parse errors
        raise ValueError(f"{path}: cannot load tokenizer: {err}") from err


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
            raise ValueError(f"{source}: tokenizer has no {what} token {name!r}")
        return None

    eos = find(eos_token, EOS_CANDIDATES, "EOS")
    if eos is None:
        raise ValueError(
            f"{source}: tokenizer has none of the usual EOS tokens {EOS_CANDIDATES}: pass --eos-token"
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
