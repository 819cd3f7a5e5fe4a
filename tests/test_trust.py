"""Files are untrusted input: a crafted checkpoint runs nothing, a corrupted one never scores.

Each crafted file is a genuine checkpoint with one node of its config replaced, re-saved with a
valid digest (so only the config check can stop it); the payload would create a marker file.
"""

from __future__ import annotations

import importlib
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adapters.sdxl_lora import LoraFileError, read_safetensors
from models.fingerprint import DIGEST_KEY, with_digest
from training.checkpoint import load_checkpoint, save_checkpoint
from training.errors import UserError
from training.inference import load_model
from training.train import train


def payload(marker: Path) -> dict:
    return {"_target_": "pathlib.Path.write_text", "self": str(marker), "data": "pwned"}


def crafted(state: dict, case: str, marker: Path) -> dict:
    """``state`` with a code-running node where ``case`` says."""
    config = state["config"]
    if case == "model":  # the whole model node
        config["model"] = payload(marker)
    elif case == "nested":  # deep inside an allowed node: a guard on the top-level target misses it
        config["model"]["act"] = {"inner": [payload(marker)]}
    elif case == "data":
        config["dataloaders"] = payload(marker)
    elif case == "eval":
        config["eval"] = {**config["eval"], "callback": payload(marker)}
    elif case == "sampler":
        state["sampling"]["solver"] = payload(marker)
    elif case == "attribute":  # a project module's import of pathlib, reached by attribute
        config["model"] = {**payload(marker), "_target_": "models.mlp.torch.save", "obj": 1, "f": str(marker)}
    elif case == "interpolation":
        config["model"]["hidden"] = "${oc.env:HOME}"
    elif case == "pipe":  # an allowed data class planted in the model, its shards a shell command
        config["model"]["act"] = {"_target_": "dataloaders.webdataset.WebDatasetData", "urls": f"pipe:touch {marker}",
                                  "tokenizer": None}  # fmt: skip
    elif case == "pipe-data":  # the same where a data set belongs
        config["dataloaders"] = {"_target_": "dataloaders.webdataset.WebDatasetData", "urls": f"pipe:touch {marker}",
                                 "tokenizer": {"_target_": "models.glide_tokenizer.GlideTokenizer"}}  # fmt: skip
    elif case == "run_name":  # not built, but resolved against when eval= is chosen
        config["run_name"] = "${oc.env:HOME}"
    elif case == "sdxl":  # passes export --lora's top-level check; the payload sits one level down
        config["model"] = {"_target_": "adapters.sdxl.SDXLLoRA", "pretrained": payload(marker)}
    return state


@pytest.fixture
def genuine(make_cfg) -> Path:
    _, objects = train(make_cfg())
    return objects["checkpoint"]


CASES = ["model", "nested", "data", "eval", "sampler", "attribute", "interpolation", "pipe", "pipe-data", "run_name"]


@pytest.mark.parametrize("case", CASES)
def test_a_crafted_checkpoint_is_refused_by_eval_only_without_running_anything(genuine, make_cfg, tmp_path, case):
    marker = tmp_path / "pwned.txt"
    bad = tmp_path / "bad.pt"
    save_checkpoint(crafted(torch.load(genuine, weights_only=True), case, marker), bad)
    with pytest.raises(UserError, match=rf"^eval_checkpoint {bad} is unsafe and was not loaded: its ") as e:
        train(make_cfg(f"eval_checkpoint={bad}", "run_name=ev", f"paths.run_dir={tmp_path}/ev"))
    assert "\n" not in str(e.value)
    assert not marker.exists() and not (tmp_path / "ev").exists()


@pytest.mark.parametrize(
    "script, args",
    [
        ("export", ["--out", "{out}"]),
        ("visualize_2d", ["--out", "{out}", "--num-samples", "10"]),
        ("export", ["--lora", "--out-dir", "{out}"]),
        ("sample_glide", ["--prompts", "{prompts}", "--out", "{out}/x.png", "--base"]),
    ],
)
def test_every_script_that_loads_a_checkpoint_refuses_a_crafted_one(genuine, tmp_path, capsys, script, args):
    marker = tmp_path / "pwned.txt"
    bad = tmp_path / "bad.pt"
    case = "sdxl" if "--lora" in args else "nested"
    save_checkpoint(crafted(torch.load(genuine, weights_only=True), case, marker), bad)
    (tmp_path / "prompts.txt").write_text("a cat\n")
    filled = [a.format(out=tmp_path / "out", prompts=tmp_path / "prompts.txt") for a in args]
    argv = [*filled, str(bad)] if script == "sample_glide" else [str(bad), *filled]
    capsys.readouterr()
    assert importlib.import_module(f"scripts.{script}").main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and re.match(
        rf"error: (--base )?checkpoint {bad} is unsafe and was not loaded: its ", lines[0]
    )
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_pickle_carrying_checkpoint_is_called_unsafe(make_cfg, tmp_path):
    bad = tmp_path / "pickle.pt"
    torch.save({"format": "denoising-zoo/1", "model": Path("/tmp")}, bad)
    with pytest.raises(UserError, match=r"is unsafe and was not loaded: it holds a pickled Python object \(pathlib"):
        load_checkpoint(bad)


def overwrite_tensor(path: Path, tensor: torch.Tensor, n_bytes: int) -> None:
    """Overwrite the first ``n_bytes`` of ``tensor``'s data where it sits inside the checkpoint file
    with NaNs, as a bad disk or a broken copy would, leaving the zip structure intact."""
    data = bytearray(path.read_bytes())
    raw = tensor.contiguous().numpy().tobytes()
    at = data.find(raw)
    assert at > 0
    data[at : at + n_bytes] = torch.full((n_bytes // 4,), math.nan).numpy().tobytes()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("part, n_bytes", [("model", 64), ("ema", 256)])
def test_a_corrupted_checkpoint_never_scores_and_names_the_last_good_one(genuine, make_cfg, tmp_path, part, n_bytes):
    state = torch.load(genuine, weights_only=True)
    weight = max(state[part].values(), key=lambda t: t.numel())
    overwrite_tensor(genuine, weight, n_bytes)
    archive = genuine.parent / "archive" / "epoch_0002.pt"  # written at the same step: it verifies
    with pytest.raises(UserError) as e:
        train(make_cfg(f"eval_checkpoint={genuine}", "run_name=ev", f"paths.run_dir={tmp_path}/ev"))
    assert str(e.value) == (
        f"eval_checkpoint {genuine} is corrupted: its contents do not match the digest written with it; "
        f"the last checkpoint that verifies is {archive} (copy it over last.pt to go on from it)"
    )
    assert not (tmp_path / "ev" / "metrics.json").exists()
    load_checkpoint(archive)  # and that one really does


def test_a_corrupted_checkpoint_without_a_good_sibling_says_so(genuine, tmp_path):
    lone = tmp_path / "lone" / "last.pt"
    lone.parent.mkdir()
    lone.write_bytes(genuine.read_bytes())
    overwrite_tensor(lone, torch.load(lone, weights_only=True)["model"]["net.0.weight"], 16)
    with pytest.raises(UserError, match="is corrupted: .*; no other checkpoint of this run verifies$"):
        load_model(lone)


def test_project_written_safetensors_carry_a_digest_that_is_checked(tmp_path):
    path = tmp_path / "lora.safetensors"
    tensors = {"a.lora_down.weight": torch.randn(4, 8), "a.lora_up.weight": torch.randn(8, 4)}
    save_file(tensors, path, metadata=with_digest(tensors, {"format": "pt"}))
    read_safetensors(path)  # verifies
    with safe_open(str(path), "pt") as f:
        assert DIGEST_KEY in f.metadata()
    overwrite = {**tensors, "a.lora_up.weight": tensors["a.lora_up.weight"] + 1}
    with safe_open(str(path), "pt") as f:
        metadata = dict(f.metadata())
    save_file(overwrite, path, metadata=metadata)  # the old digest with new tensors: corrupted
    with pytest.raises(LoraFileError, match=r"^LoRA file .* is corrupted: its tensors do not match the digest"):
        read_safetensors(path)
