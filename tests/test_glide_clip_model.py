"""GLIDE with the CLIP adapter: a fresh adapter (or one run without cond["clip"], or a dry run) is the
base model bit for bit, the gate warmup, released-layout base weights, CLIP widths read from open_clip,
and adapter-only checkpoints that refuse the wrong base or CLIP model. Tiny GLIDEs and tiny open_clip
configs, all offline."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra.utils
import pytest
import torch
from omegaconf import OmegaConf
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from adapters.glide_clip import GlideClipUNet, glide_clip_base, is_adapter_key
from adapters.open_clip_loader import ClipModelError, architecture_dim
from models import layers
from models.glide import GlideUNet
from tests.clip_helpers import register_tiny_clip
from tests.test_glide_model import TINY, TINY_UPSAMPLE, inputs, manifest, one_line_error, perturb_, tiny, tiny_upsample

torch.set_num_threads(2)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "model"
WARMUP = 1000


@pytest.fixture(scope="module")
def clip_names(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Tiny open_clip models of the three families, each with its own embedding width."""
    root = tmp_path_factory.mktemp("tiny_clip")
    dims = {"ViT-B-32": 24, "ViT-L-14": 40, "RN50": 56}
    return {family: register_tiny_clip(root, family, dim) for family, dim in dims.items()}


@pytest.fixture(scope="module")
def clip_name(clip_names: dict[str, str]) -> str:
    return clip_names["ViT-B-32"]


def make(clip_name: str, upsample: bool = False, **overrides: Any) -> GlideClipUNet:
    base = TINY_UPSAMPLE if upsample else TINY
    return GlideClipUNet(**{"clip_model_name": clip_name, "adapter_warmup_steps": WARMUP, **base, **overrides})


def perturbed(model: GlideClipUNet, seed: int = 0) -> GlideClipUNet:
    """Noise on every weight (``perturb_``), typed as the CLIP model."""
    perturb_(model, seed)
    return model


def perturb_adapter_(model: GlideClipUNet, seed: int = 0) -> GlideClipUNet:
    """Noise on the adapter's weights only (the base stays the one it was loaded with)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter_key(name):
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def saved_base(tmp_path: Path, upsample: bool = False, seed: int = 0) -> tuple[GlideUNet, Path]:
    """A perturbed plain GLIDE and its state dict saved the way OpenAI's base.pt is (a bare state dict)."""
    base = perturb_(tiny_upsample() if upsample else tiny(), seed)
    path = tmp_path / f"base-{'up' if upsample else 'base'}-{seed}.pt"
    torch.save(base.state_dict(), path)
    return base, path


def with_clip(model: GlideClipUNet, cond: dict[str, Tensor], seed: int = 2) -> dict[str, Tensor]:
    clip = torch.randn(len(cond["tokens"]), model.clip_dim, generator=torch.Generator().manual_seed(seed))
    return {**cond, "clip": clip / clip.norm(dim=-1, keepdim=True)}


# --------------------------------------------------------------------------- the base model, exactly


@pytest.mark.parametrize("upsample", [False, True], ids=["base", "upsample"])
def test_fresh_adapter_is_the_base_model_bit_for_bit(clip_name: str, tmp_path: Path, upsample: bool):
    base, path = saved_base(tmp_path, upsample)
    model = perturb_adapter_(make(clip_name, upsample, checkpoint=str(path)))
    x, t, cond = inputs(base)
    with torch.no_grad():
        expected = base(x, t, cond=cond)
        assert torch.equal(model(x, t, cond=cond), expected)  # no cond["clip"]: the branch never runs
        assert torch.equal(model(x, t, cond=with_clip(model, cond)), expected)  # step 0: gates exactly 0
    assert torch.equal(model.effective_gates(), torch.zeros(len(model.clip_attentions())))


def test_without_clip_and_dry_run_are_the_base_at_any_gate(clip_name: str, tmp_path: Path):
    base, path = saved_base(tmp_path)
    model = perturb_adapter_(make(clip_name, checkpoint=str(path)))
    model.clip_adapter.step.fill_(WARMUP // 2)
    x, t, cond = inputs(base)
    clip_cond = with_clip(model, cond)
    with torch.no_grad():
        expected = base(x, t, cond=cond)
        assert torch.equal(model(x, t, cond=cond), expected)
        assert torch.equal(model.denoise(x, t, clip_cond, gate_scale=0.0), expected)  # the dry run
        adapted = model(x, t, cond=clip_cond)
        assert torch.equal(model.denoise(x, t, clip_cond), adapted)
        assert not torch.allclose(adapted, expected, atol=1e-4)  # a nonzero gate changes the output
        other = with_clip(model, cond, seed=3)
        assert not torch.allclose(model(x, t, cond=other), adapted, atol=1e-4)  # and the embedding matters
        assert not torch.allclose(model.denoise(x, t, clip_cond, gate_scale=1.0), adapted, atol=1e-4)


def test_gate_warmup_is_min_one_step_over_warmup_times_the_gate(clip_name: str):
    model = make(clip_name, gate_max=0.5)
    n = len(model.clip_attentions())
    assert n == len(model.attention_blocks()) == 4  # tiny GLIDE, attention at 8 px: 1 input, middle, 2 output
    with torch.no_grad():
        for i, m in enumerate(model.clip_attentions()):
            m.gate.fill_(0.1 * (i + 1))
    gates = torch.tensor([0.1 * (i + 1) for i in range(n)])
    for step in (0, 1, 250, WARMUP - 1, WARMUP, 5 * WARMUP):
        model.clip_adapter.step.fill_(step)
        assert torch.allclose(model.effective_gates(), gates * min(1.0, step / WARMUP), rtol=1e-6, atol=0)
    assert model.clip_adapter.step.dtype == torch.long and model.clip_adapter.step.dim() == 0
    assert torch.equal(make(clip_name, adapter_warmup_steps=0).effective_gates(), torch.full((n,), 0.5))
    fresh = make(clip_name, gate_max=0.3)
    assert torch.equal(fresh.effective_gates(), torch.zeros(n))
    assert all(m.gate.item() == pytest.approx(0.3) for m in fresh.clip_attentions())


def test_gradients_reach_the_adapter_once_the_gates_open(clip_name: str):
    model = perturbed(make(clip_name))
    model.clip_adapter.step.fill_(10)
    x, t, cond = inputs(model)
    model(x, t, cond=with_clip(model, cond)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_clip_inputs_that_do_not_fit_raise(clip_name: str):
    model = make(clip_name)
    x, t, cond = inputs(model)
    one_line_error(ValueError, lambda: model.denoise(x, t, cond), "needs cond\\['clip'\\]")
    wrong = {**cond, "clip": torch.randn(2, model.clip_dim + 1)}
    message = one_line_error(ValueError, lambda: model(x, t, cond=wrong), "cond\\['clip'\\] has shape \\(2, 25\\)")
    assert clip_name in message


# --------------------------------------------------------------------------- base weights and layout


def test_released_layout_base_loads_strictly_with_adapter_keys_new(clip_name: str, tmp_path: Path):
    base, path = saved_base(tmp_path)
    model = make(clip_name, checkpoint=str(path), gate_max=0.25)
    state = model.state_dict()
    base_state = base.state_dict()
    assert [k for k in state if not is_adapter_key(k)] == list(base_state)  # same keys, same order
    assert all(torch.equal(state[k], v) for k, v in base_state.items())
    adapter_keys = [k for k in state if is_adapter_key(k)]
    assert {k.split(".clip_attention.")[-1] for k in adapter_keys if ".clip_attention." in k} == {
        "kv.weight",
        "kv.bias",
        "gate",
    }
    assert "clip_adapter.step" in adapter_keys
    for block, clip_attention in zip(model.attention_blocks(), model.clip_attentions(), strict=True):
        assert clip_attention is block.clip_attention
        assert torch.equal(clip_attention.kv.weight, block.encoder_kv.weight)  # IP-Adapter's init
        assert torch.equal(clip_attention.kv.state_dict()["bias"], block.encoder_kv.state_dict()["bias"])
        assert clip_attention.gate.item() == 0.25

    missing = {k: v for k, v in base_state.items() if k != "out.2.bias"}
    torch.save(missing, tmp_path / "missing.pt")
    one_line_error(ValueError, lambda: make(clip_name, checkpoint=str(tmp_path / "missing.pt")), "1 keys missing")
    torch.save(state, tmp_path / "whole.pt")
    one_line_error(
        ValueError, lambda: make(clip_name, checkpoint=str(tmp_path / "whole.pt")), "holds CLIP adapter weights"
    )
    one_line_error(ValueError, lambda: make(clip_name, from_scratch=False), "model.checkpoint=PATH")


def test_full_size_base_keys_are_the_released_ones():
    reference = manifest()["base"]["state_dict"]
    with torch.device("meta"):
        model = glide_clip_base(from_scratch=True)  # ViT-L-14 by default
    state = model.state_dict()
    assert [k for k in state if not is_adapter_key(k)] == list(reference)
    assert model.clip_dim == 768 and model.adapter_hidden == 768
    sets = {name: sum(p.numel() for _, p in params) for name, params in model.parameter_sets().items()}
    assert sets["glide_text_encoder"] + sets["glide_unet"] == 385_030_726
    # residual MLP 768 -> 768 -> 768 with its LayerNorm, 4 tokens of 512 with theirs
    assert sets["adapter_mlp"] == 2 * 768 + 2 * (768 * 768 + 768) + 768 * 4 * 512 + 4 * 512 + 2 * 512
    widths = [m.kv.out_channels // 2 for m in model.clip_attentions()]
    assert len(widths) == 22 and sets["clip_attention"] == sum(512 * 2 * c + 2 * c + 1 for c in widths)


def test_parameter_sets_partition_the_model(clip_name: str):
    model = make(clip_name)
    sets = model.parameter_sets()
    assert list(sets) == ["adapter_mlp", "clip_attention", "glide_text_encoder", "glide_unet"]
    names = [name for params in sets.values() for name, _ in params]
    assert sorted(names) == sorted(name for name, _ in model.named_parameters())  # each exactly once
    assert all(name.startswith("clip_adapter.") for name, _ in sets["adapter_mlp"])
    assert all(".clip_attention." in name for name, _ in sets["clip_attention"])
    assert len(sets["clip_attention"]) == 3 * len(model.attention_blocks())
    assert {id(p) for _, p in sets["glide_text_encoder"]} == {id(p) for p in model.text_encoder_parameters()}
    assert not any(is_adapter_key(name) for name, _ in sets["glide_unet"])


# --------------------------------------------------------------------------- CLIP widths


def test_clip_width_is_read_from_open_clip(clip_names: dict[str, str]):
    for family, dim in {"ViT-B-32": 24, "ViT-L-14": 40, "RN50": 56}.items():
        model = make(clip_names[family])
        assert model.clip_dim == dim and model.clip_adapter.fc1.in_features == dim
        assert model.adapter_hidden == dim
    assert make(clip_names["RN50"], adapter_hidden=8, adapter_tokens=3).clip_adapter.fc1.out_features == 8
    tokens = make(clip_names["RN50"], adapter_tokens=3).clip_adapter(torch.randn(2, 56))
    assert tokens.shape == (2, TINY["xf_width"], 3)  # GLIDE's per-token layout (B, W, L)


def test_real_architectures_widths_without_weights():
    assert {name: architecture_dim(name) for name in ("ViT-B-32", "ViT-L-14", "RN50")} == {
        "ViT-B-32": 512,
        "ViT-L-14": 768,
        "RN50": 1024,
    }


def test_unknown_clip_model_raises_one_line():
    message = one_line_error(ClipModelError, lambda: make("ViT-L/14"), "unknown open_clip model 'ViT-L/14'")
    assert "ViT-L-14" in message


# --------------------------------------------------------------------------- adapter-only checkpoints


def test_a_corrupted_adapter_file_is_refused(clip_name: str, tmp_path: Path):
    """The file's tensors no longer match the digest save_adapter wrote into its metadata."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = make(clip_name)
    path = tmp_path / "a.adapter.safetensors"
    model.save_adapter(path)
    with safe_open(str(path), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    first = next(iter(tensors))
    save_file({**tensors, first: tensors[first] + 1}, str(path), metadata=metadata)
    one_line_error(ValueError, lambda: model.load_adapter(path), "is corrupted: its tensors do not match the digest")


def test_adapter_round_trip_gives_identical_outputs(clip_name: str, tmp_path: Path):
    base, path = saved_base(tmp_path)
    trained = perturb_adapter_(make(clip_name, checkpoint=str(path)))
    trained.clip_adapter.step.fill_(123)
    adapter = tmp_path / "run" / "last.adapter.safetensors"
    trained.save_adapter(adapter, {"phase": "adapter_only", "run_name": "clip1"})
    assert sorted(p.name for p in adapter.parent.iterdir()) == ["last.adapter.json", "last.adapter.safetensors"]

    description = json.loads(adapter.with_suffix(".json").read_text())
    assert description["clip"] == {"model_name": clip_name, "dim": 24}
    assert description["adapter"] | {"num_parameters": 0} == {
        "tokens": 4,
        "hidden": 24,
        "gate_max": 0.5,
        "warmup_steps": WARMUP,
        "step": 123,
        "num_blocks": 4,
        "num_parameters": 0,
    }
    assert description["base"]["super_res"] is False and description["base"]["source"] == str(path)
    assert description["base"]["architecture"]["channel_mult"] == [1, 2]
    assert description["base"]["fingerprint"] == trained.base_fingerprint()
    assert description["extra"] == {"phase": "adapter_only", "run_name": "clip1"}

    at_construction = make(clip_name, checkpoint=str(path), adapter_checkpoint=str(adapter))
    afterwards = make(clip_name)
    afterwards.load_state_dict(base.state_dict(), strict=False)  # the same base weights, set another way
    afterwards.load_adapter(adapter)
    x, t, cond = inputs(base)
    clip_cond = with_clip(trained, cond)
    for loaded in (at_construction.eval(), afterwards.eval()):
        assert int(loaded.clip_adapter.step) == 123
        with torch.no_grad():
            assert torch.equal(loaded(x, t, cond=clip_cond), trained(x, t, cond=clip_cond))
            assert torch.equal(loaded.effective_gates(), trained.effective_gates())


def test_adapter_onto_another_base_or_clip_model_raises(clip_names: dict[str, str], tmp_path: Path):
    clip_name = clip_names["ViT-B-32"]
    _, path = saved_base(tmp_path)
    adapter = tmp_path / "a.safetensors"
    make(clip_name, checkpoint=str(path)).save_adapter(adapter)
    _, other_base = saved_base(tmp_path, seed=1)

    def load(**overrides: Any) -> Callable[[], object]:
        return lambda: make(**{"clip_name": clip_name, "checkpoint": str(path), **overrides}).load_adapter(adapter)

    message = one_line_error(ValueError, load(checkpoint=str(other_base)), "it was trained on base [0-9a-f]{12} ")
    assert str(path) in message and "load it onto the base it was trained on" in message
    one_line_error(
        ValueError, load(clip_name=clip_names["ViT-L-14"]), "trained on CLIP .*dim 24.* uses .*dim 40.*clip_model_name="
    )
    one_line_error(ValueError, load(adapter_tokens=2), "adapter_tokens=4")
    one_line_error(ValueError, load(num_head_channels=8), "another GLIDE architecture: num_head_channels=16")

    _, upsample_base = saved_base(tmp_path, upsample=True)
    upsampler_adapter = tmp_path / "up.safetensors"
    make(clip_name, upsample=True, checkpoint=str(upsample_base)).save_adapter(upsampler_adapter)
    message = one_line_error(
        ValueError,
        lambda: make(clip_name, checkpoint=str(path), adapter_checkpoint=str(upsampler_adapter)),
        "another GLIDE architecture",
    )
    assert "super_res=True (this model False)" in message and "image_size=32 (this model 16)" in message

    one_line_error(
        FileNotFoundError,
        lambda: make(clip_name, adapter_checkpoint=str(tmp_path / "no.safetensors")),
        "does not exist",
    )
    adapter.with_suffix(".json").unlink()
    one_line_error(FileNotFoundError, lambda: make(clip_name).load_adapter(adapter), "has no description a.json")
    one_line_error(ValueError, lambda: make(clip_name).save_adapter(tmp_path / "a.pt"), "must end in .safetensors")


# --------------------------------------------------------------------------- runtime


def test_activation_checkpointing_gives_the_same_outputs_and_gradients(clip_name: str, monkeypatch):
    calls: list[int] = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(layers, "checkpoint", counted)
    plain = perturbed(make(clip_name, dropout=0.1)).train()
    checkpointed = make(clip_name, dropout=0.1, activation_checkpointing=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    for model in (plain, checkpointed):
        model.clip_adapter.step.fill_(WARMUP // 4)
    x, t, cond = inputs(plain)
    clip_cond = with_clip(plain, cond)
    results = []
    for model in (plain, checkpointed):
        torch.manual_seed(0)  # the same dropout masks; recomputation must replay them
        out = model(x, t, cond=clip_cond)
        out.square().mean().backward()
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None for g in grads)
        results.append((out.detach(), [g for g in grads if g is not None]))
    (out_a, grads_a), (out_b, grads_b) = results
    assert len(calls) == 1 + len(plain.input_blocks) + 1 + len(plain.output_blocks)
    assert torch.allclose(out_a, out_b, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads_a, grads_b, strict=True))


def test_bf16_autocast_on_cpu(clip_name: str):
    model = perturbed(make(clip_name))
    model.clip_adapter.step.fill_(WARMUP)
    x, t, cond = inputs(model)
    clip_cond = with_clip(model, cond)
    with torch.no_grad():
        reference = model(x, t, cond=clip_cond)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, cond=clip_cond)
    assert out.dtype == torch.float32 and out.isfinite().all()
    assert (out - reference).abs().mean() < 0.1 * reference.abs().mean()


def test_model_config_instantiates(clip_name: str):
    config = OmegaConf.load(CONFIG_DIR / "glide_base_clip.yaml")
    base_config = OmegaConf.load(CONFIG_DIR / "glide_base.yaml")
    assert set(base_config) - {"_target_"} <= set(config)  # the base's options, as glide_base.yaml has them
    assert config.clip_model_name == "ViT-L-14" and config.adapter_checkpoint is None
    shrunk = OmegaConf.merge(config, {k: v for k, v in TINY.items()}, {"clip_model_name": clip_name})
    model = hydra.utils.instantiate(shrunk)
    assert isinstance(model, GlideClipUNet) and model.clip_dim == 24 and model.adapter_warmup_steps == 10_000
