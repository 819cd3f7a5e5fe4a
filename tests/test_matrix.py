"""The whole config tree: every model x loss x solver x data x eval combination is valid or refused.

The options come from the config folders (training/config_tree.py reads them), so a new YAML is covered
without editing this file. Every combination is checked against the declared kinds; the valid ones
that a pairwise cover picks are trained for a few steps with ``debug=smoke``, evaluated, and their
metrics.json checked; a refusal of each kind runs through ``train`` to show it stops before any
work. The slow tier trains one valid combination per (model class, data class, loss, solver, eval).
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import GLIDE_DATA
from training import compat_matrix, config_tree
from training.checkpoint import load_checkpoint
from training.compose import compose_config
from training.errors import UserError
from training.train import train

Case = tuple[dict[str, str], compat_matrix.DataVariant]  # (group -> option, data variant)
Refusal = tuple[dict[str, str], compat_matrix.DataVariant, str]  # ... and the one-line reason

ALL = compat_matrix.combinations()
VALID = [(names, data) for names, data, reason in ALL if reason is None]
REFUSED = [(names, data, reason) for names, data, reason in ALL if reason is not None]
OFFLINE = {"cifar10": "CIFAR-10 downloads from the internet (not reachable here); its class is covered by folder"}


def cid(names: dict[str, str], data: compat_matrix.DataVariant) -> str:
    return "-".join([names["model"], names["loss"], names["solver"], data.label(), names["eval"]]).replace(" ", "")


def _classes(names: dict[str, str]) -> dict[str, object]:
    options = config_tree.declared_options()
    return {g: options[g].get(names[g]) for g in config_tree.GROUPS}


def pairwise_cover(
    valid: list[tuple[dict[str, str], compat_matrix.DataVariant]],
) -> list[tuple[dict, compat_matrix.DataVariant]]:
    """A few valid combinations that hold every option (and data setting: tokenizer, CLIP cache, low-res)
    once and every valid pair of (loss, solver), (model class, loss / solver / data / eval), (data, loss)
    and (data, eval) at least once: greedy set cover, deterministic."""

    def features(names: dict[str, str], data: compat_matrix.DataVariant) -> set[tuple]:
        model = _classes(names)["model"]
        single = {(g, names[g]) for g in config_tree.GROUPS}
        single |= {("tokenizer", data.tokenizer), ("clip", data.clip), ("low_res", data.low_res)}
        pairs = {
            ("loss-solver", names["loss"], names["solver"]),
            ("model-loss", model, names["loss"]),
            ("model-solver", model, names["solver"]),
            ("model-data", model, names["dataloaders"]),
            ("model-eval", model, names["eval"]),
            ("data-loss", names["dataloaders"], names["loss"]),
            ("data-eval", names["dataloaders"], names["eval"]),
        }
        return single | pairs

    runnable = [(n, d) for n, d in valid if n["dataloaders"] not in OFFLINE]
    todo = set().union(*(features(n, d) for n, d in runnable))
    chosen = []
    while todo:
        best = max(runnable, key=lambda c: len(features(*c) & todo))
        chosen.append(best)
        todo -= features(*best)
    return chosen


def one_per_class(
    valid: list[tuple[dict[str, str], compat_matrix.DataVariant]],
) -> list[tuple[dict, compat_matrix.DataVariant]]:
    """One valid combination per (model class, data class and variant, loss, solver, eval)."""
    seen, out = set(), []
    for names, data in valid:
        c = _classes(names)
        key = (c["model"], c["dataloaders"], data[1:], names["loss"], names["solver"], names["eval"])
        if key not in seen and names["dataloaders"] not in OFFLINE:
            seen.add(key)
            out.append((names, data))
    return out


def refusal_kinds(
    refused: list[tuple[dict, compat_matrix.DataVariant, str]],
) -> list[tuple[dict, compat_matrix.DataVariant, str]]:
    """The first refusal of each kind of message (the message with its option names blanked)."""
    seen, out = set(), []
    for names, data, reason in refused:
        kind = re.sub(r"=[\w.|/,]+", "=*", reason)
        if kind not in seen and names["dataloaders"] not in OFFLINE:
            seen.add(kind)
            out.append((names, data, reason))
    return out


COVER = pairwise_cover(VALID)
PER_CLASS = one_per_class(VALID)
REFUSAL_KINDS = refusal_kinds(REFUSED)


def test_every_combination_is_valid_or_refused_in_one_line_that_names_both_sides_and_a_fix():
    groups = re.compile(r"\b(model|loss|solver|dataloaders|eval)[=./]")
    for names, _, reason in REFUSED:
        assert "\n" not in reason, reason
        assert len(set(groups.findall(reason))) >= 2, reason  # both sides of the mismatch
        assert re.search(r"\b(use|set|change|drop)\b", reason), reason  # and what to do instead
        assert any(f"{g}={names[g]}" in reason for g in config_tree.GROUPS), reason
    # nothing in the tree is unusable: every option of every group is in some valid combination
    for group in config_tree.GROUPS:
        options = set(config_tree.declared_options()[group]) | ({"null"} if group == "solver" else set())
        assert {names[group] for names, _ in VALID} == options, group
    assert len(VALID) > 1000 and len(REFUSED) > 10 * len(VALID)


def test_the_readme_table_is_the_declared_kinds():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert compat_matrix.compat_table() in readme, (
        "README's compatibility table is stale: python scripts/compat_table.py"
    )


# ---------------------------------------------------------------------------------------------
# what the runs need on disk: made on first use, once per session


class Assets:
    """Data sets and weights the combinations read, built lazily under one temporary folder."""

    def __init__(self, root: Path):
        self.root = root

    @functools.cached_property
    def image_folder(self) -> Path:
        from tests.test_latents import make_images

        return make_images(self.root / "images")

    @functools.cached_property
    def latents(self) -> Path:
        from adapters.vae import SDVAE
        from tests.test_latents import TINY_VAE, precompute

        torch.manual_seed(0)
        vae = self.root / "vae"
        SDVAE(config=TINY_VAE).vae.save_pretrained(vae)
        assert precompute(self.image_folder, vae, self.root / "latents", "--shard-size", "32") == 0
        return self.root / "latents"

    @functools.cached_property
    def captioned(self) -> Path:
        root = self.root / "captioned"
        root.mkdir()
        rng = np.random.default_rng(0)
        for i, (name, colour) in enumerate([("red", (220, 30, 30)), ("blue", (30, 60, 220))] * 5):
            pixels = np.clip(np.array(colour) + rng.normal(0, 20, (40, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"{i:02d}.png")
            (root / f"{i:02d}.txt").write_text(f"a {name} square\n")
        return root

    @functools.cached_property
    def shards(self) -> Path:
        import io

        import webdataset as wds

        root = self.root / "shards"
        root.mkdir()
        with wds.TarWriter(str(root / "00000.tar")) as w:
            for i, path in enumerate(sorted(self.captioned.glob("*.png"))):
                buffer = io.BytesIO()
                Image.open(path).convert("RGB").save(buffer, format="JPEG")
                w.write({"__key__": f"s{i:02d}", "jpg": buffer.getvalue(), "txt": path.with_suffix(".txt").read_text()})
        return root

    @functools.cached_property
    def sdxl(self) -> Path:
        from tests.sdxl_helpers import save_tiny_sdxl

        return save_tiny_sdxl(self.root / "tiny-sdxl")

    @functools.cached_property
    def sdxl_cache(self) -> Path:
        from scripts import precompute_sdxl

        out = self.root / "sdxl-cache"
        args = ["--folder", str(self.captioned), "--pretrained", str(self.sdxl), "--out", str(out),
                "--image-size", "64", "--batch-size", "5"]  # fmt: skip
        assert precompute_sdxl.main(args) == 0
        return out

    @functools.cached_property
    def clip(self) -> tuple[str, Path]:
        from tests.clip_helpers import register_tiny_clip, tiny_clip_weights

        name = register_tiny_clip(self.root / "clip", "ViT-L-14", embed_dim=24)
        return name, tiny_clip_weights(self.root / "clip", name)


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Assets]:
    threads = torch.get_num_threads()
    yield Assets(tmp_path_factory.mktemp("matrix-assets"))
    torch.set_num_threads(threads)


TEXT_MODELS = {"eps_var", "pipeline"}


def options_of(names: dict[str, str]) -> list[str]:
    """``group=option`` overrides; no solver is ``~solver`` (Hydra's removal of a default)."""
    return [f"{g}={names[g]}" if names[g] != "null" else f"~{g}" for g in config_tree.GROUPS]


def variant_overrides(
    data: compat_matrix.DataVariant, clip_name: str = "x", clip_weights: str = "x", clip_dir: str = "x"
) -> list[str]:
    out = [f"dataloaders/tokenizer={data.tokenizer}"] if data.tokenizer is not None else []
    out += [f"dataloaders.tokenizer.vocab_dir={GLIDE_DATA}"] if data.tokenizer == "glide" else []
    out += ["dataloaders.low_res_size=8"] if data.low_res else []
    if data.clip:
        node = (f"{{_target_:dataloaders.clip_cache.ClipCache,model_name:{clip_name},pretrained:'{clip_weights}',"
                f"dir:'{clip_dir}',"
                f"on_miss:encode,encoder:{{_target_:adapters.clip_encoder.FrozenClip,_partial_:true,"
                f"model_name:{clip_name},pretrained:'{clip_weights}'}}}}")  # fmt: skip
        out += [f"dataloaders.clip_cache={node}"]
    return out


def overrides_for(names: dict[str, str], data: compat_matrix.DataVariant, assets: Assets) -> list[str]:
    """The command line of one combination: its options, ``debug=smoke``, and where its data lives."""
    out = options_of(names) + ["debug=smoke"]
    classes = _classes(names)
    if names["dataloaders"] in OFFLINE:
        pytest.skip(OFFLINE[names["dataloaders"]])
    if getattr(classes["model"], "output", "") in TEXT_MODELS and data.tokenizer != "sdxl" and not GLIDE_DATA.is_dir():
        pytest.skip(f"GLIDE's vocabulary not at {GLIDE_DATA}")
    kind = classes["dataloaders"].kind  # type: ignore[attr-defined]
    if kind == "image" and names["dataloaders"] != "digits":
        out += [f"dataloaders.root={assets.image_folder}", "dataloaders.image_size=16"]
        out += (
            ["dataloaders.class_subfolders=true", "dataloaders.num_classes=2"]
            if names["dataloaders"] == "imagenet"
            else []
        )
    if kind == "latent":
        out += [f"dataloaders.root={assets.latents}", "dataloaders.image_size=8", "dataloaders.channels=4",
                "dataloaders.num_classes=2", "dataloaders.expected_scaling_factor=0.5"]  # fmt: skip
    if kind == "captioned":
        if names["dataloaders"] == "captions":
            out += [f"dataloaders.root={assets.captioned}"]
        if names["dataloaders"] == "webdataset":
            out += [f"dataloaders.urls={assets.shards}", "dataloaders.wds_tar_size=10",
                    "dataloaders.laion_no_filter=true", "dataloaders.min_width=8",
                    "dataloaders.min_height=8"]  # fmt: skip
        clip = (*map(str, assets.clip), str(assets.root / "clip-cache")) if data.clip else ()
        out += variant_overrides(data, *clip)
    if kind == "sdxl_cache":
        out += [f"dataloaders.root={assets.sdxl_cache}", "dataloaders.image_size=64"]
    if names["model"] == "glide_base_clip":
        out += [f"model.clip_model_name={assets.clip[0]}"]
    if names["model"] == "sdxl_lora":
        out += [f"model.pretrained={assets.sdxl}", "model.unet_dtype=float32", "model.text_encoder_dtype=float32",
                "model.activation_checkpointing=false", "dataloaders.image_size=64"]  # fmt: skip
    return out


def run_combination(names: dict[str, str], data: compat_matrix.DataVariant, assets: Assets, tmp_path: Path) -> None:
    cfg = compose_config(
        [
            *overrides_for(names, data, assets),
            "run_name=matrix",
            "device=cpu",
            f"paths.root={tmp_path}/outputs",
            f"paths.run_dir={tmp_path}/run",
            f"paths.experiment_log={tmp_path}/log.md",
        ]  # fmt: skip
    )
    metrics, objects = train(cfg)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    numbers = {k: v for k, v in saved.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert numbers and all(math.isfinite(v) for v in numbers.values()), numbers
    assert saved["train/steps"] == 4
    solver = objects["solver"]
    assert saved["eval/sampler"] == ("pipeline" if solver is None else solver.name)
    if solver is not None:
        assert saved["eval/solver"] == solver.label()
    state = load_checkpoint(objects["checkpoint"])
    assert state["sampling"]["solver"] == (None if solver is None else dict(cfg.solver))
    assert state["config"]["choices"]["solver"] == (None if names["solver"] == "null" else names["solver"])
    # eval-only from the checkpoint alone, on the launcher's defaults: the checkpoint's own sampler and evaluator
    again = compose_config(
        [f"eval_checkpoint={objects['checkpoint']}", "run_name=again", "device=cpu", "trackio.enabled=false",
         f"paths.root={tmp_path}/outputs", f"paths.run_dir={tmp_path}/again", f"paths.experiment_log={tmp_path}/log.md"]
    )  # fmt: skip
    rescored, _ = train(again)
    resaved = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert resaved["eval/sampler"] == saved["eval/sampler"] and resaved.get("eval/solver") == saved.get("eval/solver")
    assert rescored.keys() <= {*metrics, "checkpoint_step"}
    for key, value in rescored.items():  # the same weights, sampler and noise: the same scores
        assert value == pytest.approx(metrics.get(key, value), rel=1e-5), key


@pytest.mark.parametrize("names, data", COVER, ids=[cid(*c) for c in COVER])
def test_a_pairwise_cover_of_the_valid_combinations_trains_and_evaluates(names, data, assets, tmp_path):
    run_combination(names, data, assets, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("names, data", PER_CLASS, ids=[cid(*c) for c in PER_CLASS])
def test_every_valid_combination_per_class_trains_and_evaluates(names, data, assets, tmp_path):
    run_combination(names, data, assets, tmp_path)


@pytest.mark.parametrize("names, data, reason", REFUSAL_KINDS, ids=[cid(n, d) for n, d, _ in REFUSAL_KINDS])
def test_each_kind_of_refusal_stops_train_before_any_work(names, data, reason, tmp_path):
    """Refused before anything is read: the data's paths may as well be missing."""
    cfg = compose_config(
        [
            *options_of(names),
            "debug=smoke",
            *variant_overrides(data),
            "run_name=refused",
            "device=cpu",
            f"paths.root={tmp_path}/outputs",
            f"paths.run_dir={tmp_path}/run",
            f"paths.experiment_log={tmp_path}/log.md",
        ]  # fmt: skip
    )
    with pytest.raises(UserError) as refused:
        train(cfg)
    assert str(refused.value) == reason
    assert not any(tmp_path.iterdir())  # no checkpoint, run folder or log entry
