"""The GLIDE CLIP adapter trained through train(cfg): phases, gate warmup, per-group clipping, dry runs,
early stopping, rollback, adapter files, resume and the phase chain, and the test that matters most:
on colour patches whose colour is only in the CLIP embedding, the adapter learns it and GLIDE without
the adapter stays exactly as it was.

A tiny GLIDE of the real architecture, a tiny open_clip model of the ViT-B-32 family with random
weights loaded from a file (the local-weights path), and data the tests make: flat colour patches,
every caption "a patch", the `.clip` files holding the CLIP text embedding of "a <colour> patch".
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adapters.clip_encoder import FrozenClip
from adapters.glide_clip import GlideClipUNet
from dataloaders.clip_cache import CacheInfo, clip_path, stored_pretrained, write_clip_file
from models.glide import GlideUNet
from scripts import sample_glide
from tests.clip_helpers import register_tiny_clip, tiny_clip_weights
from tests.conftest import GLIDE_DATA
from tests.helpers import Recorder
from training.callbacks.clip_adapter import ClipAdapterTraining
from training.checkpoint import load_checkpoint
from training.errors import UserError
from training.train import train

pytestmark = pytest.mark.skipif(not GLIDE_DATA.is_dir(), reason=f"GLIDE's vocabulary not at {GLIDE_DATA}")

TINY_KW = {
    "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2", "num_head_channels": 16,
    "attention_resolutions": "8", "dropout": 0.0, "xf_width": 32, "xf_layers": 1, "xf_heads": 2, "text_ctx": 16,
    "image_size": 16,
}  # fmt: skip
TINY_GLIDE = [f"model.{k}='{v}'" if isinstance(v, str) else f"model.{k}={v}" for k, v in TINY_KW.items()]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (30, 60, 220), "yellow": (230, 220, 40)}


@pytest.fixture(scope="module", autouse=True)
def two_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A tiny ViT-B-32-family CLIP (24-d embeddings) and its weights file."""
    root = tmp_path_factory.mktemp("clip")
    name = register_tiny_clip(root, "ViT-B-32", embed_dim=24)
    return name, tiny_clip_weights(root, name)


@pytest.fixture(scope="module")
def patches(tmp_path_factory: pytest.TempPathFactory, clip_model: tuple[str, Path]) -> Path:
    """40 flat colour patches (a little noise); every caption says "a patch", only the .clip file says the colour."""
    name, weights = clip_model
    root = tmp_path_factory.mktemp("patches")
    encoder = FrozenClip(name, pretrained=str(weights))
    embeddings = dict(zip(COLOURS, encoder.encode_text([f"a {c} patch" for c in COLOURS]), strict=True))
    info = CacheInfo(name, stored_pretrained(str(weights)), encoder.dim, "text")
    for i in range(40):
        colour = list(COLOURS)[i % 4]
        pixels = np.broadcast_to(np.array(COLOURS[colour], dtype=np.float32), (20, 20, 3))
        image = root / f"{i:03d}.png"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(image)
        (root / f"{i:03d}.txt").write_text("a patch\n")
        write_clip_file(clip_path(image), embeddings[colour], info)
    return root


@pytest.fixture(scope="module")
def base_weights(tmp_path_factory: pytest.TempPathFactory, patches: Path) -> Path:
    """A tiny GLIDE fine-tuned on the patches, where its captions carry no information: its state dict file."""
    from tests.conftest import tiny_config

    tmp = tmp_path_factory.mktemp("base")
    cfg = tiny_config(tmp, [
        "experiment=glide_base_finetune", "model.from_scratch=true", *TINY_GLIDE, f"dataloaders.root={patches}",
        f"dataloaders.tokenizer.vocab_dir={GLIDE_DATA}", "dataloaders.image_size=16", "dataloaders.num_workers=0",
        "dataloaders.num_eval=8", "dataloaders.batch_size=8", "precision=fp32", "eval.every_epochs=0",
        "eval.samples_per_prompt=1", "solver.respacing='4'", "epochs=15", "optimizer.lr=1e-3", "loss.cond_dropout=0",
        "eval.guidance_scale=1",
        "trainer.ema_decay=0", "lr_schedule=constant", "trainer.log_every=20", "checkpoint.archive_every_epochs=0",
    ])  # fmt: skip
    _, objects = train(cfg)
    path = tmp / "base.pt"
    torch.save(objects["model"].state_dict(), path)
    return path


def adapter_cfg(make_cfg, patches: Path, clip_model: tuple[str, Path], base: Path, *overrides: str, phase: int = 1):
    """The phase-``phase`` preset, tiny, short, with every check off unless an override turns it on."""
    name, weights = clip_model
    return make_cfg(
        f"experiment=glide_clip_phase{phase}", *TINY_GLIDE, f"model.checkpoint={base}", f"model.clip_model_name={name}",
        f"clip_pretrained={weights}", "dataloaders.clip_cache.on_miss=error",
        f"dataloaders.root={patches}", f"dataloaders.tokenizer.vocab_dir={GLIDE_DATA}", "dataloaders.image_size=16",
        "dataloaders.num_workers=0", "dataloaders.num_eval=8", "dataloaders.batch_size=8", "precision=fp32",
        "eval.every_epochs=0", "eval.samples_per_prompt=1", "solver.respacing='4'", "lr_schedule=constant",
        "trainer.log_every=5", "model.adapter_warmup_steps=1", "adapter_training.adapter_lr=3e-3",
        "loss.cond_dropout=0",
        "eval.guidance_scale=1",
        "adapter_training.early_stop_every=0", "adapter_training.dry_run_interval=0",
        "adapter_training.spike_factor=0",
        "checkpoint.archive_every_epochs=0", "epochs=100", *overrides,
    )  # fmt: skip


def band_losses(model, schedule, batch: dict, bands: list[tuple[int, int]]) -> list[tuple[float, float]]:
    """(eps-MSE with CLIP, without) on the held-out batch for timesteps drawn in each band, same noise for both."""
    x0, cond = batch["x1"], batch["cond"]
    without = {k: v for k, v in cond.items() if k != "clip"}
    g = torch.Generator().manual_seed(1)
    out = []
    for lo, hi in bands:
        t = torch.randint(lo, hi, (4 * len(x0),), generator=g)
        x = x0.repeat(4, 1, 1, 1)
        noise = torch.randn(x.shape, generator=g)
        x_t = schedule.q_sample(x, t, noise)
        c, w = ({k: v.repeat(4, *[1] * (v.ndim - 1)) for k, v in d.items()} for d in (cond, without))
        with torch.no_grad():
            adapted = ((model(x_t, t.float(), None, c)[:, :3] - noise) ** 2).mean().item()
            baseline = ((model(x_t, t.float(), None, w)[:, :3] - noise) ** 2).mean().item()
        out.append((adapted, baseline))
    return out


def test_the_adapter_lowers_the_loss_and_without_it_glide_is_unchanged(
    make_cfg, patches, clip_model, base_weights
) -> None:
    """Captions say "a patch"; only the CLIP embedding names the colour. With GLIDE frozen (phase
    adapter_gates, 100 steps), the adapter lowers the held-out loss in every noise band and by more than
    5% overall, its output depends on the embedding it is given, and without the adapter the model is
    the base model it started from, bit for bit.

    What the drop is made of: with flat patches the noisy image itself tells the colour (averaging its
    pixels) at all but the highest noise levels, where eps-MSE weighs a colour error by
    alpha_bar / (1 - alpha_bar) ~ 1e-3; an adapter given the same embedding for every image lowers the
    loss as much (measured in the issue note), so here the drop is the adapter's added capacity, not the
    colour. Eps-MSE moves little for a label-like condition; this test checks the machinery, the
    docs/clip-adapter.md says what the loss can and cannot show."""
    cfg = adapter_cfg(make_cfg, patches, clip_model, base_weights, "adapter_training.phase=adapter_gates", "epochs=25",
                      "adapter_training.adapter_lr=2e-2")  # fmt: skip
    _, objects = train(cfg)
    model: GlideClipUNet = objects["model"].eval()
    batch = objects["data"].eval_batch(torch.device("cpu"))
    bands = band_losses(model, objects["trainer"].loss_fn.schedule, batch, [(0, 250), (250, 750), (750, 1000)])
    for adapted, baseline in bands:
        assert adapted < baseline, bands
    assert sum(a for a, _ in bands) < 0.95 * sum(b for _, b in bands), bands
    # GLIDE without the adapter: exactly the base model it started from
    saved = torch.load(base_weights, weights_only=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    base = GlideUNet(**TINY_KW, checkpoint=str(base_weights)).eval()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10.0, 200.0, 500.0, 900.0])
    cond = {k: v[:4] for k, v in batch["cond"].items()}
    without = {k: v for k, v in cond.items() if k != "clip"}
    other = {**cond, "clip": cond["clip"].roll(1, dims=0)}  # each image given another's embedding
    with torch.no_grad():
        assert torch.equal(model(x, t, None, without), base(x, t, None, without))
        adapted = model(x, t, None, cond)
        assert not torch.equal(adapted, base(x, t, None, without))
        assert (adapted - model(x, t, None, other)).abs().amax(dim=(1, 2, 3)).min() > 0


def test_each_phase_trains_exactly_its_parameter_set(
    make_cfg, patches, clip_model, base_weights, monkeypatch: pytest.MonkeyPatch
) -> None:
    starts: list[dict[str, torch.Tensor]] = []
    on_train_start = ClipAdapterTraining.on_train_start

    def snapshot(self, trainer, data) -> None:  # the model as training starts, then the real hook
        starts.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
        on_train_start(self, trainer, data)

    monkeypatch.setattr(ClipAdapterTraining, "on_train_start", snapshot)
    expected = {
        "adapter_only": ("adapter_mlp",),
        "adapter_gates": ("adapter_mlp", "clip_attention"),
        "full": ("adapter_mlp", "clip_attention", "glide_unet"),
    }
    for phase, sets in expected.items():
        cfg = adapter_cfg(make_cfg, patches, clip_model, base_weights, f"adapter_training.phase={phase}", "max_steps=3",
                          f"run_name={phase}", "adapter_training.main_lr=1e-3")  # fmt: skip
        _, objects = train(cfg)
        start = starts[-1]
        model: GlideClipUNet = objects["model"]
        trained = {name for key in sets for name, _ in model.parameter_sets()[key]}
        after = model.state_dict()
        changed = {k for k in after if not torch.equal(after[k], start[k])}
        assert changed - {"clip_adapter.step"} <= trained, (phase, sorted(changed - trained)[:5])
        for key in sets:  # every set of the phase really trains
            assert any(name in changed for name, _ in model.parameter_sets()[key]), (phase, key)
        frozen_text = {name for name, _ in model.parameter_sets()["glide_text_encoder"]}
        assert not frozen_text & changed  # the text encoder stays frozen (freeze_glide_text_encoder=true)
        assert not any(p.requires_grad for n, p in model.named_parameters() if n not in trained)
        groups = objects["trainer"].optimizer.param_groups
        assert [g["name"] for g in groups] == (["adapter", "main"] if phase == "full" else ["adapter"])
        assert groups[0]["betas"] == (0.9, 0.98) and groups[0]["lr"] == 3e-3
        assert model.clip_adapter.step.item() == 3


def test_full_phase_can_train_the_text_encoder_and_clips_each_group(
    make_cfg, patches, clip_model, base_weights, recorder: Recorder
) -> None:
    cfg = adapter_cfg(make_cfg, patches, clip_model, base_weights, "adapter_training.phase=full", "max_steps=5",
                      "adapter_training.freeze_glide_text_encoder=false", "adapter_training.adapter_grad_clip=1e-4",
                      "adapter_training.main_grad_clip=1e-3", "adapter_training.main_lr=1e-4")  # fmt: skip
    _, objects = train(cfg)
    model: GlideClipUNet = objects["model"]
    text = {name for name, _ in model.parameter_sets()["glide_text_encoder"]}
    assert all(p.requires_grad for n, p in model.named_parameters() if n in text)
    step, logged = [row for row in recorder.rows if "train/loss" in row[1]][-1]
    assert step == 5
    assert logged["train/grad_norm_post_clip/adapter"] == pytest.approx(1e-4)
    assert logged["train/grad_norm_post_clip/main"] == pytest.approx(1e-3)
    assert logged["train/grad_norm_pre_clip/adapter"] > 1e-4
    ratio = logged["train/grad_norm_pre_clip/adapter"] / logged["train/grad_norm_pre_clip/main"]
    assert logged["adapter/grad_norm_ratio"] == pytest.approx(ratio)
    for key in ("train/adapter/kl", "adapter/gate_mean", "adapter/gate_min", "adapter/gate_max", "train/loss"):
        assert key in logged, key


def test_gates_warm_up_on_schedule(make_cfg, patches, clip_model, base_weights, recorder: Recorder) -> None:
    cfg = adapter_cfg(make_cfg, patches, clip_model, base_weights, "max_steps=8", "model.adapter_warmup_steps=10",
                      "model.gate_max=0.5", "trainer.log_every=2")  # fmt: skip
    _, objects = train(cfg)
    gates = recorder.values("adapter/gate_mean")
    assert [s for s, _ in gates] == [2, 4, 6, 8]
    for step, value in gates:  # adapter_only: the gates are not trained, they follow min(1, step / 10) * 0.5
        assert value == pytest.approx(0.5 * step / 10, abs=1e-7)
    assert objects["ema"].module.clip_adapter.step.item() == 8  # the evaluated EMA copy warms up in step


def test_dry_runs_and_early_stopping_run_inside_training(
    make_cfg, patches, clip_model, base_weights, recorder: Recorder
) -> None:
    """Phase full at a reckless GLIDE learning rate: the baseline degrades, training stops early and the
    weights of the best check come back; every dry run found the gate-0 CLIP path exactly inert."""
    cfg = adapter_cfg(make_cfg, patches, clip_model, base_weights, "adapter_training.phase=full",
                      "adapter_training.main_lr=3e-2",
                      "adapter_training.main_grad_clip=null", "max_steps=60", "adapter_training.early_stop_every=2",
                      "adapter_training.early_stop_threshold=0.05", "adapter_training.patience=2",
                      "adapter_training.dry_run_interval=1")  # fmt: skip
    _, objects = train(cfg)
    trainer = objects["trainer"]
    assert trainer.stop_reason is not None and "early stopping" in trainer.stop_reason
    assert trainer.step < 60
    dry = recorder.values("adapter/dry_run_max_diff")
    assert len(dry) == trainer.step and all(v == 0.0 for _, v in dry)
    checks = recorder.values("adapter/baseline_degradation")
    assert [s for s, _ in checks] == list(range(2, trainer.step + 1, 2))
    assert [v > 0.05 for _, v in checks[-2:]] == [True, True]
    callback = trainer.callbacks[0]
    for name, p in callback.trained:  # the restored weights are the best check's, in the model and its EMA
        assert torch.equal(p.detach(), callback.best_state[name])
    ema = dict(objects["ema"].module.named_parameters())
    assert all(torch.equal(ema[name].detach(), callback.best_state[name]) for name, _ in callback.trained)


def test_a_loss_spike_rolls_back_to_the_last_good_state(make_cfg, patches, clip_model, base_weights) -> None:
    """A spike factor below 1 makes every log point after the window fills a 'spike': each one must put the
    weights back to the last good state, so training after that point changes nothing."""
    cfg = adapter_cfg(make_cfg, patches, clip_model, base_weights, "max_steps=12", "trainer.log_every=1",
                      "adapter_training.spike_factor=1e-6", "adapter_training.spike_window=5")  # fmt: skip
    _, objects = train(cfg)
    callback = objects["trainer"].callbacks[0]
    assert callback.rollbacks == 12 - 5
    weights, _ = callback.last_good
    for name, p in callback.trained:
        assert torch.equal(p.detach(), weights[name])


def test_adapter_files_resume_and_the_phase_chain(make_cfg, patches, clip_model, base_weights, tmp_path) -> None:
    cfg = adapter_cfg(make_cfg, patches, clip_model, base_weights, "max_steps=6", "run_name=p1", "deterministic=true",
                      "adapter_training.early_stop_every=3", "adapter_training.dry_run_interval=3")  # fmt: skip
    _, whole = train(cfg)
    ckpt_dir = whole["checkpoint"].parent
    raw, ema = ckpt_dir / "last.adapter.safetensors", ckpt_dir / "last.adapter_ema.safetensors"
    assert raw.is_file() and ema.is_file() and raw.with_suffix(".json").is_file()
    assert raw.stat().st_size < whole["checkpoint"].stat().st_size / 2  # adapter tensors only

    # stopped at step 3 and resumed: the same weights as the run that went through
    first = adapter_cfg(make_cfg, patches, clip_model, base_weights, "max_steps=3", "run_name=p1b",
                        "deterministic=true", "adapter_training.early_stop_every=3",
                        "adapter_training.dry_run_interval=3")  # fmt: skip
    train(first)
    resumed = adapter_cfg(make_cfg, patches, clip_model, base_weights, "max_steps=6", "run_name=p1b",
                          "deterministic=true", "adapter_training.early_stop_every=3",
                          "adapter_training.dry_run_interval=3", "resume=true")  # fmt: skip
    _, again = train(resumed)
    a, b = whole["model"].adapter_state_dict(), again["model"].adapter_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # a resume in another phase is refused (the optimizer groups differ): the next phase is a new run
    with pytest.raises(UserError, match="start the next phase as a new run"):
        train(adapter_cfg(make_cfg, patches, clip_model, base_weights, "max_steps=8", "run_name=p1b", "resume=true",
                          "adapter_training.phase=adapter_gates"))  # fmt: skip

    # phase 2 starts from phase 1's adapter file: same adapter weights, warmup step carried on
    phase2 = adapter_cfg(make_cfg, patches, clip_model, base_weights, "previous_run=p1", "run_name=p2",
                         "max_steps=2", phase=2)  # fmt: skip
    _, second = train(phase2)
    assert second["model"].clip_adapter.step.item() == 6 + 2
    state = load_checkpoint(second["checkpoint"], "test")
    assert state["config"]["model"]["adapter_checkpoint"].endswith("p1/last.adapter.safetensors")


def test_bad_adapter_setups_are_one_line_errors(make_cfg, patches, clip_model, base_weights, tmp_path) -> None:
    with pytest.raises(UserError, match="adapter_training.phase"):
        train(adapter_cfg(make_cfg, patches, clip_model, base_weights, "adapter_training.phase=everything"))
    with pytest.raises(UserError, match="unknown open_clip model 'ViT-Q-14'; did you mean"):
        train(adapter_cfg(make_cfg, patches, clip_model, base_weights, "model.clip_model_name=ViT-Q-14",
                          "dataloaders.clip_cache.model_name=ViT-Q-14"))  # fmt: skip
    with pytest.raises(UserError, match="drop the param_groups rules"):
        train(adapter_cfg(make_cfg, patches, clip_model, base_weights, "param_groups=[{pattern: 'x', lr: 1}]"))
    with pytest.raises(UserError, match="needs CLIP embeddings in every batch"):
        train(adapter_cfg(make_cfg, patches, clip_model, base_weights, "dataloaders.clip_cache=null", "max_steps=1"))


def test_prompt_grids_and_sampling_condition_on_clip(make_cfg, patches, clip_model, base_weights, tmp_path) -> None:
    """Grids during training encode their prompts with CLIP; sample_glide.py puts an adapter file on bare
    base weights, conditions on prompts or an image, and refuses a base the adapter was not trained on."""
    name, weights = clip_model
    encoder = f"{{_target_: adapters.clip_encoder.FrozenClip, model_name: {name}, pretrained: '{weights}'}}"
    cfg = adapter_cfg(make_cfg, patches, clip_model, base_weights, "max_steps=4", "eval.every_steps=2",
                      f"eval.clip_encoder={encoder}", "eval.prompts=[a patch]")  # fmt: skip
    _, objects = train(cfg)
    grids = sorted(p.name for p in (tmp_path / "run" / "grids").iterdir())
    assert grids == ["grid_final.png", "grid_step0000002.png", "grid_step0000004.png"]

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a patch\n")
    adapter = objects["checkpoint"].parent / "last.adapter_ema.safetensors"
    out = tmp_path / "samples" / "grid.png"
    argv = ["--prompts", str(prompts), "--base", str(base_weights), "--adapter", str(adapter), "--clip-pretrained",
            str(weights), "--vocab-dir", str(GLIDE_DATA), "--samples", "2", "--base-respacing", "4",
            "--out", str(out)]  # fmt: skip
    assert sample_glide.main(argv) == 0
    assert Image.open(out).size == (2 * 16 + 3 * 2, 16 + 2 * 2)
    assert sample_glide.main([*argv, "--clip-image", str(patches / "000.png")]) == 0
    other = tmp_path / "other_base.pt"
    torch.save(GlideUNet(**TINY_KW, from_scratch=True).state_dict(), other)
    wrong = argv.copy()
    wrong[wrong.index("--base") + 1] = str(other)
    assert sample_glide.main(wrong) == 2
