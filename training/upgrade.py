"""Configs stored in older checkpoints, in today's names: a class that moved keeps loading under its new
``_target_``, and a loss written before an option gains the value it trained with.

Applied to a checkpoint's config before it is checked as untrusted data (``training.trusted``): an old
name is rewritten only when this table lists it, so a renamed target is still one that configs/ builds.
"""

from __future__ import annotations

from typing import Any

# old _target_ -> new _target_; add a row whenever a configured class moves
RENAMED_TARGETS: dict[str, str] = {
    "models.glide_clip.GlideClipUNet": "adapters.glide_clip.GlideClipUNet",
    "evaluation.sample_eval.EnergyDistanceEval": "evaluation.energy_evaluator.EnergyDistanceEval",
    "evaluation.sample_eval.ImageEval": "evaluation.image_evaluator.ImageEval",
    "evaluation.fid_eval.FIDEval": "evaluation.fid_evaluator.FIDEval",
    "evaluation.prompt_eval.PromptGridEval": "evaluation.prompt_grid_evaluators.PromptGridEval",
    "evaluation.pipeline_eval.PipelinePromptEval": "evaluation.prompt_grid_evaluators.PipelinePromptEval",
    "adapters.clip_training.ClipAdapterTraining": "training.callbacks.clip_adapter.ClipAdapterTraining",
    "adapters.sdxl_training.SDXLLoraTraining": "training.callbacks.sdxl_lora.SDXLLoraTraining",
}

LEGACY_DROPOUT = ("uncond_p", "class_dropout", "caption_dropout")  # each loss's name before cond_dropout
LEGACY_CHECKPOINTING = ("use_checkpoint", "gradient_checkpointing")  # GLIDE's and SDXL's name of the switch


def upgrade_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with moved targets renamed and its loss node in today's options."""
    config = rename_targets(config)
    if "adapter" in config:  # the group's name before adapter_training
        config["adapter_training"] = config.pop("adapter")
        if isinstance(config.get("choices"), dict) and "adapter" in config["choices"]:
            config["choices"]["adapter_training"] = config["choices"].pop("adapter")
    if isinstance(config.get("loss"), dict):
        config["loss"] = upgrade_loss_config(config["loss"])
    if isinstance(config.get("model"), dict):
        config["model"] = upgrade_model_config(config["model"])
    return config


def upgrade_model_config(model: dict[str, Any]) -> dict[str, Any]:
    """GLIDE's ``use_checkpoint`` and SDXL's ``gradient_checkpointing`` are ``activation_checkpointing`` now."""
    old = [k for k in LEGACY_CHECKPOINTING if k in model]
    if not old or "activation_checkpointing" in model:
        return model
    return {**{k: v for k, v in model.items() if k not in old}, "activation_checkpointing": model[old[0]]}


def rename_targets(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            k: RENAMED_TARGETS.get(v, v) if k == "_target_" and isinstance(v, str) else rename_targets(v)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [rename_targets(v) for v in node]
    return node


def upgrade_loss_config(loss: dict[str, Any]) -> dict[str, Any]:
    """A loss config written before an option in today's names, so such runs resume and re-score."""
    return _with_path(_with_cond_dropout(loss))


def _with_cond_dropout(loss: dict[str, Any]) -> dict[str, Any]:
    """Its dropout key becomes ``cond_dropout`` (0 where it had none, as it trained), and MeanFlow's
    ``num_classes`` (now the data's) goes."""
    if "cond_dropout" in loss:
        return loss
    old = [k for k in LEGACY_DROPOUT if k in loss]
    upgraded = {k: v for k, v in loss.items() if k not in (*LEGACY_DROPOUT, "num_classes")}
    return {**upgraded, "cond_dropout": loss[old[0]] if old else 0.0}  # fm had none: it trained without


FLOW_MATCHING = "losses.flow_matching.FlowMatchingLoss"
MEANFLOW = "losses.meanflow.MeanFlowLoss"


def _with_path(loss: dict[str, Any]) -> dict[str, Any]:
    """A flow loss from before ``path`` and ``time_sampler`` gains the ones it built inline: the straight line
    (flow matching's ``sigma`` moves into it), uniform times for flow matching, and for MeanFlow the logit-normal
    of its ``mu`` and ``sigma``, which were in the paper's reversed time (so the mean is -mu)."""
    target = loss.get("_target_")
    if "path" in loss or target not in (FLOW_MATCHING, MEANFLOW):
        return loss
    if target == FLOW_MATCHING:
        rest = {k: v for k, v in loss.items() if k != "sigma"}
        path = {"_target_": "paths.affine.LinearPath", "sigma": loss.get("sigma", 0.0)}
        return {**rest, "path": path, "time_sampler": {"_target_": "paths.time.UniformTimeSampler"}}
    mu = loss.get("mu", -0.4)
    if isinstance(mu, bool) or not isinstance(mu, (int, float)):
        raise ValueError(f"its loss.mu is {mu!r}, not a number")
    rest = {k: v for k, v in loss.items() if k not in ("mu", "sigma")}
    times = {
        "_target_": "paths.time.LogitNormalTimeSampler",
        "mean": 0.0 - mu,
        "std": loss.get("sigma", 1.0),
    }
    return {**rest, "path": {"_target_": "paths.affine.LinearPath", "sigma": 0.0}, "time_sampler": times}
