"""Which models, losses, samplers, data sets and evaluators go together, checked once before any work.

Every piece declares its kind as class attributes (no instance is needed, so nothing is built or
read to check a run):

- data sets: ``kind`` (``dense`` | ``image`` | ``latent`` | ``captioned`` | ``sdxl_cache``);
- models: ``data_kinds`` they take, ``output`` (``field``: a tensor of x's shape, which the loss makes
  a velocity, an average velocity or eps; ``eps_var``: GLIDE's eps and learned variance;
  ``pipeline``: a model sampled by its own diffusers pipeline) and optional ``traits``;
- losses: ``trains`` (``velocity`` | ``average_velocity`` | ``eps``), the ``model_outputs`` they
  can train, optional ``data_kinds`` and ``model_traits``, and ``cond_dropout``;
- samplers: ``samples`` (the ``trains`` kinds they can sample);
- evaluators: ``data_kinds``, ``model_outputs`` and ``uses_sampler``.

``check(spec)`` turns the first mismatch into a one-line error naming both sides and the options
that fit (read from the config folders, training/config_tree.py, only when a message needs them).
``Spec.from_config`` reads a composed config; training/compat_matrix.py enumerates the whole tree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from training.config_tree import GROUPS, declared, declared_options, target_class
from training.errors import UserError


@dataclass(frozen=True)
class Spec:
    """The declared kinds of one run's pieces, by group, and the few values the rules read."""

    names: Mapping[str, str]  # group -> option name, for messages
    classes: Mapping[str, Any]  # group -> the class (or None: solver=null)
    num_classes: int = 0
    cond_dropout: float = 0.0
    guidance_scale: float = 1.0
    loss_settings: Mapping[str, Any] | None = None
    tokenizer: Any = None  # the data's tokenizer class, for captioned data
    provides: tuple[str, ...] = ()  # optional batch entries the data is configured to add (``clip``, ``low_res``)
    model_settings: Mapping[str, Any] | None = None
    solver_settings: Mapping[str, Any] | None = None
    nfe: tuple[int, ...] = ()  # the evaluator's NFE budgets

    @property
    def data_kind(self) -> str:
        return declared(self.classes["dataloaders"], "kind", "")

    @property
    def output(self) -> str:
        """What the model predicts: ``field``, ``eps_var`` or ``pipeline``."""
        return declared(self.classes["model"], "output", "")

    @classmethod
    def from_config(cls, cfg: DictConfig | Mapping[str, Any], names: Mapping[str, str]) -> Spec:
        node = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else cfg
        assert isinstance(node, Mapping)
        solver = node.get("solver") or {}
        if isinstance(cfg, DictConfig) and cfg.get("solver") is not None:  # its settings follow the loss's
            solver = OmegaConf.to_container(cfg.solver, resolve=True)
        classes = {group: target_class(node.get(group)) for group in GROUPS}
        loss = node.get("loss") or {}
        data = node.get("dataloaders") or {}
        ev = node.get("eval") or {}
        return cls(
            names=dict(names),
            classes=classes,
            num_classes=_number(data.get("num_classes", 0)),
            cond_dropout=float(_number(loss.get("cond_dropout", 0.0))),
            guidance_scale=float(_number(ev.get("guidance_scale", 1.0))),
            loss_settings=dict(loss),
            tokenizer=target_class(data.get("tokenizer")),
            provides=tuple(k for k, key in (("clip", "clip_cache"), ("low_res", "low_res_size")) if data.get(key)),
            model_settings=dict(node.get("model") or {}),
            solver_settings=dict(solver),
            nfe=tuple(n for n in (node.get("eval") or {}).get("nfe") or () if isinstance(n, int)),
        )


def _number(value: Any) -> Any:
    """An unresolved interpolation (``${dataloaders.num_classes}``) counts as its default: these rules
    run on the resolved config at run time; the enumeration reads files."""
    return 0 if isinstance(value, str) and value.startswith("${") else value


class _LazyOptions(Mapping):
    """Every option's class, imported on the first message that names the options that fit: a valid
    run imports only its own classes."""

    def __getitem__(self, group: str) -> Mapping[str, Any]:
        return declared_options()[group]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(declared_options())

    def __len__(self) -> int:
        return len(declared_options())


def _fits(options: Mapping[str, Any], ok: Any) -> str:
    names = [name for name, c in options.items() if c is not None and ok(c)]
    return "|".join(names) if names else "(none)"


def _data_conditioning(spec: Spec) -> str:
    data = spec.classes["dataloaders"]
    if declared(data, "kind", "") in ("captioned", "sdxl_cache"):
        return "text"
    return "class" if spec.num_classes > 0 else "none"


def problem(spec: Spec, options: Mapping[str, Mapping[str, Any]] | None = None) -> str | None:
    """The first reason the pieces do not fit, as one line; None when they do."""
    options = _LazyOptions() if options is None else options
    return next((reason for check in CHECKS if (reason := check(spec, options)) is not None), None)


def _model_takes_data(spec: Spec, options: Mapping[str, Mapping[str, Any]]) -> str | None:
    n, data_kind, model_kinds = spec.names, spec.data_kind, declared(spec.classes["model"], "data_kinds")
    if data_kind not in model_kinds:
        fit = _fits(options["dataloaders"], lambda d: declared(d, "kind", "") in model_kinds)
        return (
            f"model={n['model']} takes {'|'.join(model_kinds)} data; dataloaders={n['dataloaders']} serves "
            f"{data_kind} data: use dataloaders={fit}"
        )
    return None


def _loss_trains_model(spec: Spec, options: Mapping[str, Mapping[str, Any]]) -> str | None:
    n, loss, output, traits = spec.names, spec.classes["loss"], spec.output, declared(spec.classes["model"], "traits")
    loss_outputs = loss.trainable_outputs(spec.loss_settings or {})
    if output not in loss_outputs or not set(declared(loss, "model_traits")) <= set(traits):

        def trains_model(l_: Any) -> bool:
            return output in l_.trainable_outputs({}) and set(declared(l_, "model_traits")) <= set(traits)

        what = "no CLIP adapter" if declared(loss, "model_traits") and output in loss_outputs else f"{output} output"
        if output in loss.trainable_outputs({}) and output not in loss_outputs:
            return (
                f"loss={n['loss']} with these loss.* settings trains {'|'.join(loss_outputs)} models; "
                f"model={n['model']} has {what}: change the loss.* override (e.g. loss.loss_type=simple)"
            )
        return (
            f"loss={n['loss']} trains {'|'.join(loss_outputs)} models"
            f"{' with ' + ', '.join(declared(loss, 'model_traits')) if declared(loss, 'model_traits') else ''}; "
            f"model={n['model']} has {what}: use loss={_fits(options['loss'], trains_model)}"
        )
    return None


def _model_gets_its_inputs(spec: Spec, options: Mapping[str, Mapping[str, Any]]) -> str | None:
    n, model, loss = spec.names, spec.classes["model"], spec.classes["loss"]
    data_kind, output = spec.data_kind, spec.output
    tokens, reads = declared(spec.tokenizer, "kind", None), declared(model, "tokenizer", None)
    if data_kind == "captioned" and reads is not None and tokens != reads:
        return (
            f"model={n['model']} reads {reads} tokens; dataloaders={n['dataloaders']} tokenizes for {tokens}: "
            f"use dataloaders/tokenizer={reads}"
        )
    needs = model.needs_cond(spec.model_settings or {})
    if [k for k in needs if k not in spec.provides]:
        return (
            f"model={n['model']} upsamples cond['low_res']; dataloaders={n['dataloaders']} has no low_res_size: "
            "set dataloaders.low_res_size=64 (experiment=glide_upsample_finetune does)"
        )
    missing = [k for k in declared(loss, "needs_cond") if k not in spec.provides]
    if missing:
        return (
            f"loss={n['loss']} needs CLIP embeddings in every batch (cond['clip']); dataloaders={n['dataloaders']} "
            "has no clip_cache: set dataloaders.clip_cache (as experiment=glide_clip_phase1 does)"
        )
    loss_data = declared(loss, "data_kinds")
    if loss_data and data_kind not in loss_data:
        return (
            f"loss={n['loss']} trains on {'|'.join(loss_data)} data (its samplers clip to [-1, 1]); "
            f"dataloaders={n['dataloaders']} serves {data_kind} data: use loss="
            + _fits(options["loss"], lambda l_: output in l_.trainable_outputs({})
                    and (not declared(l_, "data_kinds") or data_kind in declared(l_, "data_kinds")))
        )  # fmt: skip
    return None


def _eval_scores_model(spec: Spec, options: Mapping[str, Mapping[str, Any]]) -> str | None:
    n, ev, data_kind, output = spec.names, spec.classes["eval"], spec.data_kind, spec.output
    if data_kind not in declared(ev, "data_kinds") or output not in declared(ev, "model_outputs"):
        fit = _fits(
            options["eval"], lambda e: data_kind in declared(e, "data_kinds") and output in declared(e, "model_outputs")
        )
        return (
            f"eval={n['eval']} scores {'|'.join(declared(ev, 'model_outputs'))} models on "
            f"{'|'.join(declared(ev, 'data_kinds'))} data; model={n['model']} on dataloaders={n['dataloaders']} "
            f"is {output} on {data_kind} data: use eval={fit}"
        )
    return None


def _sampler_fits(spec: Spec, options: Mapping[str, Mapping[str, Any]]) -> str | None:
    n, c = spec.names, spec.classes
    loss, sampler, ev = c["loss"], c["solver"], c["eval"]
    trains = declared(loss, "trains", "")
    if declared(ev, "uses_sampler", True):
        if sampler is None:
            fit = _fits(options["solver"], lambda s: trains in declared(s, "samples"))
            return f"eval={n['eval']} samples with the run's solver, and there is none: use solver={fit}"
        if trains not in declared(sampler, "samples"):
            fit = _fits(options["solver"], lambda s: trains in declared(s, "samples"))
            return (
                f"solver={n['solver']} samples {'|'.join(declared(sampler, 'samples'))} models; model={n['model']} "
                f"with loss={n['loss']} predicts {trains}: use solver={fit}"
            )
    elif sampler is not None:
        return (
            f"eval={n['eval']} samples through the model's own pipeline, so solver={n['solver']} would be "
            "ignored: drop it with ~solver (as experiment=sdxl_lora does)"
        )
    limit = sampler.max_nfe(spec.solver_settings or {}) if sampler is not None else None
    if limit is not None and any(n > limit for n in spec.nfe):
        return (
            f"eval.nfe={list(spec.nfe)} asks solver={n['solver']} for more steps than its {limit}-step schedule: "
            f"use eval.nfe values up to {limit}"
        )
    return None


def _guidance_fits(spec: Spec, options: Mapping[str, Mapping[str, Any]]) -> str | None:
    n, model = spec.names, spec.classes["model"]
    settings = spec.loss_settings or {}
    if (_number(settings.get("omega", 1.0)) != 1.0 or _number(settings.get("kappa", 0.0)) != 0.0) and (
        _data_conditioning(spec) != "class"
    ):
        return (
            f"loss.omega/kappa (training-time guidance) need class labels; dataloaders={n['dataloaders']} has none: "
            "set dataloaders.num_classes or leave loss.omega=1 loss.kappa=0"
        )
    if spec.guidance_scale != 1.0:
        if _data_conditioning(spec) == "none":
            return (
                f"eval.guidance_scale={spec.guidance_scale:g} needs a conditional model; "
                f"dataloaders={n['dataloaders']} has no classes or captions: use eval.guidance_scale=1"
            )
        pretrained = model.learned_null(spec.model_settings or {})
        if spec.cond_dropout <= 0 and not pretrained:
            return (
                f"eval.guidance_scale={spec.guidance_scale:g} needs a model trained with the null condition, but "
                f"loss={n['loss']} has cond_dropout=0 and model={n['model']} starts from no weights that learned it: "
                "set loss.cond_dropout=0.1, or eval.guidance_scale=1"
            )
    return None


CHECKS = (
    _model_takes_data,
    _loss_trains_model,
    _model_gets_its_inputs,
    _eval_scores_model,
    _sampler_fits,
    _guidance_fits,
)


def check(spec: Spec, options: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Raise the first mismatch as a one-line ``UserError``."""
    reason = problem(spec, options)
    if reason is not None:
        raise UserError(reason)


def uses_sampler(eval_node: Any) -> bool:
    """Whether the evaluator a config node builds samples with the run's solver."""
    return bool(declared(target_class(eval_node), "uses_sampler", True))


def choices_of(cfg: DictConfig) -> dict[str, str]:
    """The group options a composed config was made of (``cfg.choices``, recorded in checkpoints too)."""
    return {group: "null" if cfg.choices[group] is None else str(cfg.choices[group]) for group in GROUPS}
