"""GLIDE's tokenizer: GPT-2's byte-level BPE on lower-cased text, padded to ``text_ctx`` with the end token.

The BPE itself is Hugging Face ``tokenizers`` (Rust, batched) loaded from GPT-2's vocabulary, which is
the file GLIDE ships as ``encoder.json``/``vocab.bpe``. GLIDE lower-cases the caption with Python's
``str.lower`` before encoding, so we do the same rather than use the library's Unicode normaliser.
Captions longer than the context are cut (GLIDE's behaviour) and counted in ``truncated``.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE
from torch import Tensor

GPT2_REPO = "openai-community/gpt2"
# (vocabulary, merges) file names: GLIDE's, then GPT-2's; each may also be gzipped
VOCAB_NAMES = (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt"))
END_OF_TEXT = "<|endoftext|>"


def read_text(path: Path) -> str:
    """A UTF-8 file's text, gunzipped when the name ends in .gz."""
    return gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text(encoding="utf-8")


def find_vocab_files(vocab_dir: Path) -> tuple[Path, Path]:
    """The (vocabulary, merges) pair in ``vocab_dir`` under GLIDE's or GPT-2's names, plain or gzipped."""
    for vocab, merges in VOCAB_NAMES:
        for suffix in ("", ".gz"):
            pair = (vocab_dir / f"{vocab}{suffix}", vocab_dir / f"{merges}{suffix}")
            if pair[0].is_file() and pair[1].is_file():
                return pair
    names = ", ".join(f"{v}/{m}" for v, m in VOCAB_NAMES)
    raise FileNotFoundError(f"no GPT-2 BPE vocabulary in {vocab_dir}: expected {names} (optionally .gz)")


def download_vocab_files() -> tuple[Path, Path]:
    """GPT-2's vocab.json and merges.txt from the Hugging Face hub (or its local cache when offline)."""
    try:
        return (
            Path(hf_hub_download(GPT2_REPO, "vocab.json")),
            Path(hf_hub_download(GPT2_REPO, "merges.txt")),
        )
    except OSError as err:  # what the hub client raises when offline or unreachable
        raise ValueError(
            f"GPT-2's tokenizer files ({GPT2_REPO} vocab.json, merges.txt) are not in the Hugging Face cache and "
            "could not be downloaded (offline?): pass vocab_dir= a folder with encoder.json/vocab.bpe or "
            "vocab.json/merges.txt (they ship with GLIDE and GPT-2)"
        ) from err


class GlideTokenizer:
    """Captions -> ``(tokens (B, text_ctx) long, mask (B, text_ctx) bool)``, GLIDE's text input.

    ``vocab_dir`` holds GLIDE's ``encoder.json``/``vocab.bpe`` or GPT-2's ``vocab.json``/``merges.txt``
    (plain or ``.gz``); ``None`` takes GPT-2's from the Hugging Face hub cache. Padding is the end token
    with mask False, so the model's padding embedding replaces it; an empty caption is GLIDE's
    unconditional input. ``truncated`` counts the captions cut to ``text_ctx`` so far.
    """

    kind = "glide"  # the tokens GLIDE models read (training/compat.py)

    def __init__(self, vocab_dir: str | None = None, text_ctx: int = 128):
        vocab_path, merges_path = download_vocab_files() if vocab_dir is None else find_vocab_files(Path(vocab_dir))
        vocab: dict[str, int] = json.loads(read_text(vocab_path))
        merges = [
            (pair[0], pair[1])
            for pair in (line.split() for line in read_text(merges_path).splitlines() if not line.startswith("#"))
            if len(pair) == 2
        ]
        if END_OF_TEXT not in vocab:
            raise ValueError(f"{vocab_path} is not GPT-2's vocabulary: it has no {END_OF_TEXT} token")
        self.text_ctx = text_ctx
        self.truncated = 0
        self._end_token = vocab[END_OF_TEXT]
        self._tokenizer = Tokenizer(BPE(vocab, merges))
        self._tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self._tokenizer.decoder = decoders.ByteLevel()

    @property
    def end_token(self) -> int:
        """GPT-2's ``<|endoftext|>`` (50256): GLIDE's padding token."""
        return self._end_token

    @property
    def n_vocab(self) -> int:
        return self._tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """The BPE ids of the lower-cased text, not truncated or padded."""
        return self._tokenizer.encode(text.lower(), add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids)

    def __call__(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        encoded = self._tokenizer.encode_batch([c.lower() for c in captions], add_special_tokens=False)
        tokens = torch.full((len(captions), self.text_ctx), self.end_token, dtype=torch.long)
        mask = torch.zeros(len(captions), self.text_ctx, dtype=torch.bool)
        for row, enc in enumerate(encoded):
            ids = enc.ids[: self.text_ctx]
            self.truncated += len(enc.ids) > self.text_ctx
            tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[row, : len(ids)] = True
        return tokens, mask  # (B, text_ctx) each
