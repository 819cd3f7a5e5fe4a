"""GLIDE's UNet: the full-size state dicts against the released checkpoints' manifest, and the
behaviour of tiny models of the same architecture."""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from models import layers
from models.glide import (
    AttentionBlock,
    GlideUNet,
    TextAttention,
    glide_base,
    glide_param_groups,
    glide_upsample,
)

torch.set_num_threads(2)

GLIDE_DATA = Path(__file__).resolve().parents[2] / "shared/data/glide"
MANIFEST = GLIDE_DATA / "glide_state_dict_manifest.json.gz"
TEXT_CTX = 16
N_VOCAB = 64

TINY = dict(
    image_size=16,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1,2",
    num_head_channels=16,
    attention_resolutions="8",
    dropout=0.0,
    text_ctx=TEXT_CTX,
    xf_width=32,
    xf_layers=1,
    xf_heads=2,
    n_vocab=N_VOCAB,
    from_scratch=True,
)
TINY_UPSAMPLE = {**TINY, "image_size": 32, "channel_mult": [1, 1, 2], "super_res": True}


def tiny(**overrides: Any) -> GlideUNet:
    return GlideUNet(**{**TINY, **overrides})


def tiny_upsample(**overrides: Any) -> GlideUNet:
    return GlideUNet(**{**TINY_UPSAMPLE, **overrides})


def perturb_(model: GlideUNet, seed: int = 0) -> GlideUNet:
    """Noise on every weight, so the zero-initialised layers stop hiding the rest of the network."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.eval()


def inputs(model: GlideUNet, batch: int = 2, seed: int = 1) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """x, GLIDE timesteps and a caption of 5 tokens (plus ``low_res`` for the upsampler)."""
    gen = torch.Generator().manual_seed(seed)
    size = 32 if model.super_res else 16
    x = torch.randn(batch, 3, size, size, generator=gen)
    t = torch.tensor([10.0, 900.0])[:batch]
    tokens = torch.randint(0, N_VOCAB - 1, (batch, TEXT_CTX), generator=gen)
    mask = torch.arange(TEXT_CTX).expand(batch, TEXT_CTX) < 5
    cond = {"tokens": torch.where(mask, tokens, N_VOCAB - 1), "mask": mask}
    if model.super_res:
        cond["low_res"] = torch.randn(batch, 3, 8, 8, generator=gen)
    return x, t, cond


MAKERS = [pytest.param(tiny, id="base"), pytest.param(tiny_upsample, id="upsample")]


# --------------------------------------------------------------------------- the released architecture


def manifest() -> dict[str, Any]:
    if not MANIFEST.is_file():
        pytest.skip(f"GLIDE reference data not found at {GLIDE_DATA} (shared/data/glide beside the repo)")
    return json.loads(gzip.decompress(MANIFEST.read_bytes()))


@pytest.mark.parametrize(
    ("name", "factory", "num_params"),
    [("base", glide_base, 385_030_726), ("upsample", glide_upsample, 398_361_286)],
)
def test_full_size_state_dict_is_the_released_one_key_for_key(name: str, factory: Callable, num_params: int):
    reference = manifest()[name]
    with torch.device("meta"):
        from_options = GlideUNet(**reference["options"], from_scratch=True)
        from_factory = factory(from_scratch=True)
    for model in (from_options, from_factory):
        shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
        assert list(shapes) == list(reference["state_dict"])  # same keys, same order
        assert shapes == reference["state_dict"]
        assert sum(p.numel() for p in model.parameters()) == reference["num_params"] == num_params


def test_text_encoder_and_unet_parameters_split_the_model():
    with torch.device("meta"):
        model = glide_base(from_scratch=True)
    groups = glide_param_groups(model)
    text, unet = ({id(p) for p in group} for group in groups.values())
    assert not text & unet and text | unet == {id(p) for p in model.parameters()}
    text_names = {n for n, p in model.named_parameters() if id(p) in text}
    assert {n.split(".")[0] for n in text_names} == {
        "transformer",
        "token_embedding",
        "positional_embedding",
        "padding_embedding",
        "final_ln",
        "transformer_proj",
    }
    # GLIDE's text encoder: 16 layers of width 512, a 50257-token table and the projection to 4 x 192
    assert (
        sum(p.numel() for p in groups["text_encoder"])
        == 16 * 3_152_384 + 50257 * 512 + 2 * 128 * 512 + 1024 + 513 * 768
    )


# --------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("make", MAKERS)
def test_forward_and_backward_shapes(make):
    model = perturb_(make())
    x, t, cond = inputs(model)
    out = model(x, t, None, cond)
    assert out.shape == (2, 6, *x.shape[-2:]) and out.dtype == x.dtype
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_fresh_model_predicts_zero():
    model = tiny()
    x, t, cond = inputs(model)
    assert torch.equal(model(x, t, cond=cond), torch.zeros(2, 6, 16, 16))


@pytest.mark.parametrize("make", MAKERS)
def test_no_cond_is_the_empty_caption(make):
    model = perturb_(make())
    x, t, cond = inputs(model)
    empty = {**cond, "mask": torch.zeros_like(cond["mask"])}
    without = {"low_res": cond["low_res"]} if model.super_res else None
    with torch.no_grad():
        assert torch.allclose(model(x, t, cond=without), model(x, t, cond=empty), atol=1e-6)
        assert not torch.allclose(model(x, t, cond=cond), model(x, t, cond=empty), atol=1e-3)


def test_only_unmasked_tokens_matter():
    model = perturb_(tiny())
    x, t, cond = inputs(model)
    padded = cond["tokens"].clone()
    padded[:, 5:] = 7  # masked positions
    real = cond["tokens"].clone()
    real[:, 2] = (real[:, 2] + 1) % (N_VOCAB - 1)  # an unmasked position
    with torch.no_grad():
        out = model(x, t, cond=cond)
        assert torch.equal(model(x, t, cond={**cond, "tokens": padded}), out)
        assert not torch.allclose(model(x, t, cond={**cond, "tokens": real}), out, atol=1e-3)


def test_timestep_matters():
    model = perturb_(tiny())
    x, t, cond = inputs(model)
    with torch.no_grad():
        assert not torch.allclose(model(x, t, cond=cond), model(x, t + 1, cond=cond), atol=1e-4)


@pytest.mark.parametrize("make", MAKERS)
def test_activation_checkpointing_gives_the_same_outputs_and_gradients(make, monkeypatch):
    calls = []
    monkeypatch.setattr(layers, "checkpoint", lambda *a, **kw: calls.append(1) or checkpoint(*a, **kw))
    plain = perturb_(make(dropout=0.1)).train()
    checkpointed = make(dropout=0.1, activation_checkpointing=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    x, t, cond = inputs(plain)
    results = []
    for model in (plain, checkpointed):
        torch.manual_seed(0)  # the same dropout masks; recomputation must replay them
        out = model(x, t, cond=cond)
        out.square().mean().backward()
        results.append((out.detach(), [p.grad for p in model.parameters()]))
    (out_a, grads_a), (out_b, grads_b) = results
    assert len(calls) == 1 + len(plain.input_blocks) + 1 + len(plain.output_blocks)  # text layer + every stage
    assert torch.allclose(out_a, out_b, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads_a, grads_b, strict=True))


@pytest.mark.parametrize("make", MAKERS)
def test_bf16_autocast_on_cpu(make):
    model = perturb_(make())
    x, t, cond = inputs(model)
    with torch.no_grad():
        reference = model(x, t, cond=cond)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, cond=cond)
    assert out.dtype == torch.float32 and out.isfinite().all()
    assert (out - reference).abs().mean() < 0.1 * reference.abs().mean()


def glide_qkv_attention(qkv: Tensor, encoder_kv: Tensor, heads: int) -> Tensor:
    """GLIDE's QKVAttention written out: each head's channels are [q | k | v], the text's [k | v]
    come first, and q and k are each scaled by d^-1/4."""
    B, width, T = qkv.shape
    d = width // (3 * heads)
    q, k, v = qkv.reshape(B * heads, 3 * d, T).split(d, dim=1)
    ek, ev = encoder_kv.reshape(B * heads, 2 * d, -1).split(d, dim=1)
    k, v = torch.cat([ek, k], dim=-1), torch.cat([ev, v], dim=-1)
    scale = 1 / math.sqrt(math.sqrt(d))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale).softmax(dim=-1)
    return torch.einsum("bts,bcs->bct", weight, v).reshape(B, -1, T)


def test_attention_block_uses_glides_head_layout():
    block = AttentionBlock(64, num_heads=4, encoder_channels=32)
    nn.init.normal_(block.proj_out.weight)
    x, text = torch.randn(2, 64, 4, 4), torch.randn(2, 32, 16)
    qkv = block.qkv(block.norm(x).reshape(2, 64, 16))
    expected = x + block.proj_out(glide_qkv_attention(qkv, block.encoder_kv(text), 4)).reshape(2, 64, 4, 4)
    assert torch.allclose(block(x, text), expected, atol=1e-5)


def test_text_attention_uses_glides_head_layout():
    attn = TextAttention(32, heads=2)
    x = torch.randn(2, 16, 32)
    qkv = attn.c_qkv(x).view(2, 16, 2, -1)  # (B, L, heads, 3d): GLIDE splits the last dim into q, k, v
    q, k, v = qkv.split(16, dim=-1)
    weight = torch.einsum("bthc,bshc->bhts", q, k).div(4.0).softmax(dim=-1)
    expected = attn.c_proj(torch.einsum("bhts,bshc->bthc", weight, v).reshape(2, 16, 32))
    assert torch.allclose(attn(x), expected, atol=1e-5)


def test_upsampler_needs_low_res():
    model = tiny_upsample()
    x, t, cond = inputs(model)
    with pytest.raises(ValueError, match="needs cond\\['low_res'\\]"):
        model(x, t, cond={"tokens": cond["tokens"], "mask": cond["mask"]})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"attention_resolutions": "4,3"}, "match no feature-map size"),
        ({"channel_mult": ""}, "no default channel_mult for image_size=16"),
        ({"inpaint": True}, "inpainting"),
    ],
)
def test_options_that_do_not_fit_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)


# --------------------------------------------------------------------------- loading weights


def test_checkpoint_round_trip(tmp_path: Path):
    source = perturb_(tiny())
    path = tmp_path / "tiny.pt"
    torch.save(source.state_dict(), path)
    loaded = tiny(checkpoint=str(path), from_scratch=False).eval()
    x, t, cond = inputs(source)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, cond=cond), source(x, t, cond=cond))


def one_line_error(error: type[Exception], make: Callable[[], object], match: str) -> str:
    with pytest.raises(error, match=match) as info:
        make()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_base_weights_into_the_upsampler_and_back_raise_naming_the_mix_up(tmp_path: Path):
    base, upsample = tmp_path / "base.pt", tmp_path / "upsample.pt"
    torch.save(tiny(image_size=32, channel_mult="1,1,2").state_dict(), base)
    torch.save(tiny_upsample().state_dict(), upsample)
    one_line_error(
        ValueError, lambda: tiny_upsample(checkpoint=str(base)), "looks like a base model checkpoint .*input_blocks.0.0"
    )
    one_line_error(
        ValueError,
        lambda: tiny(image_size=32, channel_mult="1,1,2", checkpoint=str(upsample)),
        "looks like an upsampler checkpoint .*6 input channels",
    )


def test_other_mismatches_name_the_key(tmp_path: Path):
    path = tmp_path / "tiny.pt"
    torch.save(tiny().state_dict(), path)
    one_line_error(ValueError, lambda: tiny(xf_final_ln=False, checkpoint=str(path)), "unexpected keys .*final_ln")
    one_line_error(ValueError, lambda: tiny(n_vocab=65, checkpoint=str(path)), "token_embedding.weight has shape")


def test_files_that_are_not_a_state_dict_raise_one_line(tmp_path: Path):
    training, garbage = tmp_path / "last.pt", tmp_path / "garbage.pt"
    torch.save({"format": "denoisingzoo", "model": tiny().state_dict()}, training)
    garbage.write_bytes(b"not a checkpoint")
    one_line_error(ValueError, lambda: tiny(checkpoint=str(training)), "not a bare state dict")
    one_line_error(ValueError, lambda: tiny(checkpoint=str(garbage)), "truncated or not a torch file")


def test_missing_checkpoint_and_no_weights_at_all_raise_one_line(tmp_path: Path):
    one_line_error(FileNotFoundError, lambda: tiny(checkpoint=str(tmp_path / "nope.pt")), "does not exist")
    message = one_line_error(ValueError, lambda: tiny(from_scratch=False), "model.checkpoint=PATH")
    assert "dec-2021/base.pt" in message and "upsample.pt" in message and "model.from_scratch=true" in message
