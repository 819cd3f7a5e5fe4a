"""GLIDE's tokenizer against the ids GLIDE's own BPE gives (shared/data/glide/token_examples.json)."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError

from models import glide_tokenizer
from models.glide_tokenizer import GlideTokenizer

GLIDE_DATA = Path(__file__).resolve().parents[2] / "shared/data/glide"


@pytest.fixture(scope="module")
def glide_data() -> Path:
    if not (GLIDE_DATA / "token_examples.json").is_file():
        pytest.skip(f"GLIDE reference data not found at {GLIDE_DATA} (shared/data/glide beside the repo)")
    return GLIDE_DATA


@pytest.fixture(scope="module")
def tokenizer(glide_data: Path) -> GlideTokenizer:
    return GlideTokenizer(str(glide_data))


def examples(glide_data: Path) -> dict:
    return json.loads((glide_data / "token_examples.json").read_text(encoding="utf-8"))


def test_ids_padding_and_mask_match_glides_tokenizer(tokenizer: GlideTokenizer, glide_data: Path):
    reference = examples(glide_data)
    assert tokenizer.end_token == reference["end_token"] and tokenizer.n_vocab == reference["n_vocab"]
    cases = reference["examples"]
    tokens, mask = tokenizer([case["text"] for case in cases])
    assert tokens.shape == mask.shape == (len(cases), reference["text_ctx"])
    assert tokens.dtype == torch.long and mask.dtype == torch.bool
    for row, case in enumerate(cases):
        assert tokenizer.encode(case["text"]) == case["tokens"], case["text"]
        assert tokens[row, :12].tolist() == case["padded_first_12"]
        assert mask[row].sum() == case["mask_sum"] and mask[row, : case["mask_sum"]].all()
        assert (tokens[row, case["mask_sum"] :] == tokenizer.end_token).all()
    assert tokenizer.truncated == 0


def test_text_is_lower_cased(tokenizer: GlideTokenizer):
    assert tokenizer.encode("A Photo Of A CORGI") == tokenizer.encode("a photo of a corgi")
    assert tokenizer.decode(tokenizer.encode("A Photo Of A CORGI")) == "a photo of a corgi"


def test_long_captions_are_cut_to_the_context_and_counted(glide_data: Path):
    tokenizer = GlideTokenizer(str(glide_data), text_ctx=8)
    long = "a painting of a fox in the style of starry night"  # 12 tokens
    tokens, mask = tokenizer([long, "a corgi", long])
    assert tokens[0].tolist() == tokenizer.encode(long)[:8] and mask[0].all()
    assert mask[1].sum() == 3
    assert tokenizer.truncated == 2
    tokenizer(["an oil painting of a corgi wearing a hat"])  # 9 tokens
    assert tokenizer.truncated == 3


def test_gpt2_file_names_work_too(glide_data: Path, tmp_path: Path):
    for glide_name, gpt2_name in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
        (tmp_path / gpt2_name).write_bytes(gzip.decompress((glide_data / f"{glide_name}.gz").read_bytes()))
    assert GlideTokenizer(str(tmp_path)).encode("an oil painting of a corgi") == [
        272,
        3056,
        12036,
        286,
        257,
        1162,
        12397,
    ]


def test_a_folder_without_the_vocabulary_raises(tmp_path: Path, glide_data: Path):
    shutil.copy(glide_data / "encoder.json.gz", tmp_path)  # merges missing
    with pytest.raises(FileNotFoundError, match="no GPT-2 BPE vocabulary .*vocab.json/merges.txt"):
        GlideTokenizer(str(tmp_path))


def test_offline_without_a_cached_vocabulary_names_the_fix(monkeypatch: pytest.MonkeyPatch):
    def offline(*args: object, **kwargs: object) -> str:
        raise LocalEntryNotFoundError("offline and not in the cache")

    monkeypatch.setattr(glide_tokenizer, "hf_hub_download", offline)
    with pytest.raises(ValueError, match="pass vocab_dir=") as info:
        GlideTokenizer()
    assert "\n" not in str(info.value)
