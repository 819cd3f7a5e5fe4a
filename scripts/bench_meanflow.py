"""MeanFlow next to flow matching: one-step quality on 2D toys and the cost of a training step.

    python scripts/bench_meanflow.py                                      # 2D quality + UNet step cost (CPU)
    python scripts/bench_meanflow.py --device cuda --parts unet dit       # bf16 step cost, UNet and DiT-B/2
    python scripts/bench_meanflow.py --parts 2d --steps 30 --seeds 0 --datasets moons    # smoke runs
    python scripts/bench_meanflow.py --parts unet --unet-steps 10 --repeats 1

Every run goes through the launcher's config (``configs/train.yaml`` composed with overrides by
``training.compose.compose_config``). Three parts (``--parts``):

``2d``, quality. On moons and 8gaussians, in the setup of ``scripts/bench_2d.py`` (MLP of width
256 with 3 hidden layers, batch 256, AdamW at 1e-3 with a constant rate, no gradient clipping,
one epoch of ``--steps`` steps so every step sees fresh points, EMA decay 0.999), ``train`` trains
MeanFlow (``loss=meanflow solver=meanflow``), flow matching (``loss=fm solver=euler``) and
flow matching with minibatch OT coupling (``loss=fm_ot solver=euler``) for every seed. Each run is
scored by the framework's evaluator: 5000 samples (``--eval-samples``) from the same noise, energy
distance (ED) to the same held-out set, at MeanFlow's budgets (NFE 1, 2) or Euler's (NFE 1, 10,
100). Medians over seeds. The target: MeanFlow at 1 NFE no worse than OT-FM at 1 NFE, judged on the framework's
default evaluation, the EMA weights (``eval_use_ema=true``); the raw weights of the same run are
scored from the same noise and judged beside it.

``unet``, step cost. Flow matching and MeanFlow on the same UNet, batch and seed, trained by
``train`` on digits (16x16x1, labels as the class condition): MeanFlow with the jvp only on the
25% of samples with r != t (the default, ``loss.full_batch_jvp=false``) and with the jvp on the
whole batch (``loss.full_batch_jvp=true``). ms/step is the trainer's own steady-state figure
(``train/ms_per_step_steady``, the median over logging windows after the first, which holds the
warm-up), so it is the whole step: loss, backward, clipping, fused AdamW, EMA. Within a repeat the
variants run one after the other and the order rotates from repeat to repeat; the ratio to flow
matching is taken within each repeat and its median over repeats is judged against the target,
at most 1.3x (the MeanFlow paper reports +16%). CPU runs fp32; ``--device cuda`` runs
``precision=bf16`` and adds a row with the jvp in a CUDA graph (``loss.use_cuda_graph=true``).

``dit``, CUDA only. DiT-B/2 (``model=dit_b2``) on random 32x32x4 latents with 1000 classes,
batch 64, bf16: the model, loss, optimizer, precision and trainer are built from the composed
config and the framework's ``Trainer`` trains them on an in-memory loader (no data config holds
latents, and ``train`` builds its data from the config). Images/s are timed with
``torch.cuda.synchronize`` around ``--cuda-steps`` steps after 10 untimed ones; memory is
``torch.cuda.max_memory_allocated`` over the variant's steps. The UNet's variants, and one more:
the jvp under autocast (``loss.jvp_fp32=false``, not the default). By default MeanFlow's forward,
jvp and so its backward run in fp32 even under ``precision=bf16``, while flow matching's run in
bf16. (On the UNet that row was left out: its bf16 jvp ran at about 2.5 s/step on an H100.)

With the defaults, ``--device cuda --parts unet dit`` should take about 3 minutes on an H100 (an
estimate from per-step times of a shorter run).

Every per-seed and per-repeat number goes to ``--out`` (JSON), rewritten after each run.
"""

from __future__ import annotations

import argparse
import gc
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dataloaders.base import TensorLoader
from evaluation.contract import EvalContext
from training.benchmark import (
    alternating,
    environment,
    markdown_table,
    median,
    medians_by,
    peak_memory_mb,
    reset_peak_memory,
    rotated,
    run_config,
    timed,
    toy_overrides,
    verdict,
    write_report,
)
from training.compose import CONFIG_DIR
from training.seeding import seed_everything
from training.tracking import Tracker
from training.train import train

log = logging.getLogger("bench_meanflow")

PARTS = ("2d", "unet", "dit")

# --- 2D: scripts/bench_2d.py's setup ---------------------------------------------------------
DATASETS = ("moons", "8gaussians")
EMA, RAW = "EMA (default)", "raw"


@dataclass(frozen=True)
class Method:
    """A loss and the sampler it is scored with, at its NFE budgets."""

    name: str
    overrides: tuple[str, ...]
    nfe: tuple[int, ...]


MEANFLOW = Method("MeanFlow", ("loss=meanflow", "solver=meanflow"), (1, 2))
FM = Method("FM", ("loss=fm", "solver=euler"), (1, 10, 100))
OT_FM = Method("OT-FM", ("loss=fm_ot", "solver=euler"), (1, 10, 100))
METHODS = (MEANFLOW, FM, OT_FM)
NFE = sorted({n for m in METHODS for n in m.nfe})


# --- step cost: UNet and DiT-B/2 -------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """One training objective whose step is timed; ``meanflow`` variants are held to the target."""

    key: str  # names its runs
    name: str
    overrides: tuple[str, ...]
    meanflow: bool = True


MF_LOSS = ("loss=meanflow", "solver=meanflow")
FM_STEP = Variant("fm", "FM", ("loss=fm", "solver=euler"), meanflow=False)
MF_SELECTIVE = Variant("mf", "MeanFlow, jvp on the 25% with r != t (default)", MF_LOSS)
MF_FULL = Variant("mf_full", "MeanFlow, full-batch jvp", (*MF_LOSS, "loss.full_batch_jvp=true"))
MF_GRAPH = Variant("mf_graph", "MeanFlow, full-batch jvp in a CUDA graph",
                   (*MF_LOSS, "loss.full_batch_jvp=true", "loss.use_cuda_graph=true"))  # fmt: skip
MF_AUTOCAST_JVP = Variant("mf_autocast_jvp", "MeanFlow, jvp under autocast (jvp_fp32=false)",
                          (*MF_LOSS, "loss.jvp_fp32=false"))  # fmt: skip
STEP_TARGET = 1.3  # MeanFlow's ms/step at most this multiple of flow matching's
DIT_WARMUP = 10
DIT_BATCH = 64
DIT_LATENT = (4, 32, 32)
DIT_CLASSES = 1000


def step_variants(device: str) -> tuple[list[Variant], list[str]]:
    """The UNet variants timed on ``device`` and notes on the ones left out."""
    variants = [FM_STEP, MF_SELECTIVE, MF_FULL]
    if device != "cuda":
        return variants, []
    notes = []
    if "use_cuda_graph" in OmegaConf.load(CONFIG_DIR / "loss" / "meanflow.yaml"):
        variants.append(MF_GRAPH)
    else:
        notes.append(f"'{MF_GRAPH.name}' skipped: configs/loss/meanflow.yaml has no use_cuda_graph")
    return variants, notes


def dit_variants(unet_variants: list[Variant]) -> list[Variant]:
    return [*unet_variants, MF_AUTOCAST_JVP]


# --- results ---------------------------------------------------------------------------------
@dataclass
class ToyResult:
    """One 2D run scored with one set of weights: ``energy_distance[nfe]``."""

    dataset: str
    method: str
    seed: int
    weights: str
    ms_per_step: float
    energy_distance: dict[int, float]


@dataclass
class StepResult:
    """One timed run of a step-cost variant; ``peak_mb`` on CUDA only.

    ``fastest_window_ms``: ms/step of the trainer's fastest logging window after warm-up. On a
    shared machine other work only ever adds time, so it shows the cost without the interference.
    """

    part: str
    variant: str
    repeat: int
    ms_per_step: float
    fastest_window_ms: float
    images_per_s: float
    peak_mb: float | None


# --- 2D ----------------------------------------------------------------------------------------
def run_toy(args: argparse.Namespace, dataset: str, method: Method, seed: int, root: Path) -> list[ToyResult]:
    """Train once; the EMA weights are scored by ``train`` itself, the raw ones from the same noise."""
    overrides = [*toy_overrides(dataset, args.steps, args.eval_samples, method.nfe), *method.overrides, f"seed={seed}"]
    cfg = run_config(f"mf_{dataset}_{method.name}_s{seed}", overrides, args.device, root)
    metrics, objects = train(cfg)
    raw_metrics = instantiate(cfg.eval)(
        objects["model"], objects["solver"], objects["data"].eval_inputs(), EvalContext(torch.device(cfg.device))
    )
    ms = metrics["train/ms_per_step"]
    results = [
        ToyResult(dataset, method.name, seed, weights, ms, {n: m[f"eval/energy_distance@nfe{n}"] for n in method.nfe})
        for weights, m in ((EMA, metrics), (RAW, raw_metrics))
    ]
    log.info("%s %s seed %d: %.3f ms/step, ED@nfe1 %.4g (EMA), %.4g (raw)", dataset, method.name, seed, ms,
             results[0].energy_distance[1], results[1].energy_distance[1])  # fmt: skip
    return results


ToySummary = dict[tuple[str, str, str], dict[str, Any]]  # (dataset, method, weights) -> medians over seeds


def toy_medians(results: list[ToyResult]) -> ToySummary:
    return medians_by(results, lambda r: (r.dataset, r.method, r.weights), ("ms_per_step", "energy_distance"))


def toy_table(summary: ToySummary) -> str:
    rows = []
    for (dataset, method, weights), s in summary.items():
        ms = f"{s['ms_per_step']:.3f}" if weights == EMA else "(same run)"
        eds = (f"{s['energy_distance'][n]:.4g}" if n in s["energy_distance"] else "" for n in NFE)
        rows.append([dataset, method, weights, ms, *eds])
    header = ["data", "method", "weights", "ms/step", *(f"ED@{n}" for n in NFE)]
    return markdown_table(header, rows, "lllr" + "r" * len(NFE))


def toy_target_table(summary: ToySummary, datasets: Sequence[str]) -> str:
    """MeanFlow's ED at 1 NFE over OT-FM's, per data set and weights; the target is <= 1."""
    rows = []
    for dataset in datasets:
        for weights in (EMA, RAW):
            mf = summary[(dataset, MEANFLOW.name, weights)]["energy_distance"][1]
            ot = summary[(dataset, OT_FM.name, weights)]["energy_distance"][1]
            rows.append([dataset, weights, f"{mf:.4g}", f"{ot:.4g}", f"{mf / ot:.3f}", verdict(mf / ot, 1)])
    header = ["data", "weights", "MeanFlow ED@1", "OT-FM ED@1", "MeanFlow / OT-FM", "<= 1"]
    return markdown_table(header, rows, "llrrrc")


# --- UNet step cost ----------------------------------------------------------------------------
def unet_precision(device: str) -> str:
    return "bf16" if device == "cuda" else "fp32"


def unet_overrides(args: argparse.Namespace, variant: Variant, repeat: int) -> list[str]:
    return [
        "dataloaders=digits",
        f"dataloaders.batch_size={args.unet_batch}",
        "model=unet",
        f"model.channels={args.unet_channels}",
        f"model.channel_mult=[{','.join(map(str, args.unet_mult))}]",
        f"model.num_res_blocks={args.unet_res_blocks}",
        f"model.attention_resolutions=[{','.join(map(str, args.unet_attention))}]",
        "model.dropout=0",
        *variant.overrides,
        f"precision={unet_precision(args.device)}",
        "lr_schedule=constant",
        f"epochs={args.unet_steps}",  # more than enough: max_steps stops the run
        f"max_steps={args.unet_steps}",
        f"trainer.log_every={args.log_every}",
        "eval=image",  # train always ends with an evaluation: keep it small
        "eval.nfe=[1]",
        "eval.num_samples=16",
        "eval.every_epochs=0",
        "checkpoint.every_epochs=1000000",  # no checkpoint between epochs, only the final one
        f"seed={repeat}",
    ]


def run_unet(args: argparse.Namespace, variant: Variant, repeat: int, root: Path) -> StepResult:
    cfg = run_config(f"unet_{variant.key}_{repeat}", unet_overrides(args, variant, repeat), args.device, root)
    reset_peak_memory(torch.device(args.device))  # train's figure is the process's peak, not the run's
    metrics, objects = train(cfg)
    ms = metrics["train/ms_per_step_steady"]
    fastest = 1000 / max(objects["trainer"].step_rates[1:])  # the windows the steady figure is the median of
    peak = metrics.get("gpu/max_memory_allocated_mb")  # CUDA only
    log.info("unet repeat %d, %s: %.2f ms/step steady (fastest window %.2f, whole run %.2f)", repeat, variant.name,
             ms, fastest, metrics["train/ms_per_step"])  # fmt: skip
    return StepResult("unet", variant.name, repeat, ms, fastest, 1000 * args.unet_batch / ms, peak)


# --- DiT-B/2 step cost (CUDA) ------------------------------------------------------------------
def run_dit(args: argparse.Namespace, variant: Variant, repeat: int, root: Path) -> StepResult:
    """The framework's Trainer, built as ``train`` builds it, on random latents held in memory."""
    c, h, w = DIT_LATENT
    overrides = [
        "model=dit_b2",
        "dataloaders=digits",  # only for the shape keys the model config reads; its data is not built
        f"dataloaders.image_size={h}",
        f"dataloaders.channels={c}",
        f"dataloaders.num_classes={DIT_CLASSES}",
        *variant.overrides,
        "precision=bf16",
        "lr_schedule=constant",
        f"trainer.log_every={args.log_every}",
        f"seed={repeat}",
    ]
    cfg = run_config(f"dit_{variant.key}_{repeat}", overrides, "cuda", root)
    device = torch.device("cuda")
    precision = instantiate(cfg.precision)
    precision.check(device)
    precision.apply()
    seed_everything(cfg.seed, deterministic=False)
    model = instantiate(cfg.model).to(device)
    loss_fn = instantiate(cfg.loss)
    loss_fn.check(device)
    optimizer = instantiate(cfg.optimizer)(params=model.parameters())
    lr_schedule = instantiate(cfg.lr_schedule)(optimizer=optimizer, total_steps=DIT_WARMUP + args.cuda_steps)
    trainer = instantiate(cfg.trainer)(model=model, loss_fn=loss_fn, optimizer=optimizer, lr_schedule=lr_schedule,
                                       precision=precision, device=device, tracker=Tracker())  # fmt: skip
    n = DIT_BATCH * (DIT_WARMUP + args.cuda_steps)  # one epoch, fresh latents every step
    latents = {"x1": torch.randn(n, c, h, w, device=device), "cond": torch.randint(0, DIT_CLASSES, (n,), device=device)}
    loader = TensorLoader(latents, DIT_BATCH, seed=repeat)
    reset_peak_memory(device)
    trainer.fit(loader, epochs=1, max_steps=DIT_WARMUP)
    seconds, _ = timed(partial(trainer.fit, loader, epochs=1, max_steps=DIT_WARMUP + args.cuda_steps), device)
    ms = 1000 * seconds / args.cuda_steps
    fastest = 1000 / max(trainer.step_rates[-(args.cuda_steps // args.log_every) :])  # the timed steps' windows
    peak = peak_memory_mb(device)
    log.info("dit %s: %.2f ms/step (fastest window %.2f), %.0f MB", variant.name, ms, fastest, peak)
    return StepResult("dit", variant.name, repeat, ms, fastest, 1000 * DIT_BATCH / ms, peak)


def release_cuda() -> None:
    """Free the last variant's model, optimizer state and graph pools before the next one."""
    gc.collect()
    torch.cuda.empty_cache()


# --- step-cost tables ----------------------------------------------------------------------------
def step_table(results: list[StepResult], variants: list[Variant]) -> str:
    """Medians over repeats. Each ratio to flow matching is taken within a repeat, and its median
    judged against the target; the same for the fastest windows, shown beside."""
    fm = {r.repeat: r for r in results if r.variant == FM_STEP.name}
    rows = []
    for v in variants:
        runs = [r for r in results if r.variant == v.name]
        ratios = [r.ms_per_step / fm[r.repeat].ms_per_step for r in runs]
        fastest_ratios = [r.fastest_window_ms / fm[r.repeat].fastest_window_ms for r in runs]
        peak = median(r.peak_mb for r in runs)
        rows.append([
            v.name,
            f"{median(r.ms_per_step for r in runs):.2f}",
            f"{median(r.images_per_s for r in runs):.0f}",
            "" if peak is None else f"{peak:.0f}",
            f"{median(ratios):.3f}",
            f"{min(ratios):.3f}-{max(ratios):.3f}",
            verdict(median(ratios), STEP_TARGET) if v.meanflow else "",
            f"{median(r.fastest_window_ms for r in runs):.2f}",
            f"{median(fastest_ratios):.3f}",
        ])  # fmt: skip
    header = ["variant", "ms/step", "images/s", "peak MB", "/ FM", "range over repeats", f"<= {STEP_TARGET}",
              "fastest window ms/step", "/ FM"]  # fmt: skip
    return markdown_table(header, rows, "lrrrrrcrr")


# --- driver --------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="dit runs on --device cuda only")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--out", type=Path, default=Path("outputs/bench_meanflow.json"), help="every run's numbers (JSON)")
    toy = p.add_argument_group("2d")
    toy.add_argument("--steps", type=int, default=3000, help="training steps per 2D run")
    toy.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    toy.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    toy.add_argument("--eval-samples", type=int, default=5000, help="samples scored, and held-out points")
    step = p.add_argument_group("unet and dit")
    step.add_argument("--repeats", type=int, default=3, help="rounds of every variant, in rotating order")
    step.add_argument("--unet-steps", type=int, help="training steps per UNet run (default: 40 on CPU, 20 on CUDA)")
    step.add_argument("--log-every", type=int, default=5, help="trainer.log_every: one steady-state window")
    step.add_argument("--unet-batch", type=int, default=64)
    step.add_argument("--unet-channels", type=int, default=64)
    step.add_argument("--unet-mult", type=int, nargs="+", default=[1, 2], help="model.channel_mult")
    step.add_argument("--unet-res-blocks", type=int, default=2)
    step.add_argument("--unet-attention", type=int, nargs="+", default=[8], help="attention resolutions")
    step.add_argument("--cuda-steps", type=int, default=20, help=f"timed DiT-B/2 steps (after {DIT_WARMUP} untimed)")
    args = p.parse_args(argv)
    if args.unet_steps is None:
        args.unet_steps = 20 if args.device == "cuda" else 40
    if args.unet_steps < 2 * args.log_every or args.cuda_steps < args.log_every:
        p.error(
            "--unet-steps must be at least 2 * --log-every (the steady-state figure skips the first window) "
            "and --cuda-steps at least --log-every"
        )
    return args


def measure(args: argparse.Namespace, variants: list[Variant]) -> dict[str, list]:
    """Every run of the chosen parts; the results are written to ``--out`` after each."""
    results: dict[str, list] = {part: [] for part in args.parts}
    with tempfile.TemporaryDirectory(prefix="bench_meanflow_") as tmp:
        root = Path(tmp)
        if "2d" in args.parts:
            for dataset in args.datasets:
                for turn, seed in enumerate(args.seeds):
                    for method in rotated(METHODS, turn):  # no method always gets the warm process
                        results["2d"] += run_toy(args, dataset, method, seed, root)
                        write_report(args.out, environment(vars(args), args.device), **results)
        if "unet" in args.parts:
            for variant, repeat in alternating(variants, args.repeats):
                results["unet"].append(run_unet(args, variant, repeat, root))
                write_report(args.out, environment(vars(args), args.device), **results)
        if "dit" in args.parts and args.device == "cuda":
            for variant in dit_variants(variants):
                release_cuda()
                results["dit"].append(run_dit(args, variant, 0, root))
                write_report(args.out, environment(vars(args), args.device), **results)
    return results


def report(args: argparse.Namespace, results: dict[str, list], variants: list[Variant], notes: list[str]) -> str:
    """The markdown tables of every part that ran."""
    where = args.device + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else "")
    out = [f"{where}, {args.threads} threads, torch {torch.__version__}"]
    if "2d" in args.parts:
        summary = toy_medians(results["2d"])
        out += [
            f"## 2D: energy distance, median over seeds {args.seeds}, {args.steps} steps",
            "Scored by the framework's default evaluation, the EMA weights (decay 0.999); the raw weights of "
            "the same runs are scored from the same noise. ms/step: the trainer's timer over the whole run.",
            toy_table(summary),
            "Target: MeanFlow at 1 NFE no worse than OT-coupled FM at 1 NFE",
            toy_target_table(summary, args.datasets),
        ]
    if "unet" in args.parts:
        out += [
            f"## UNet step cost, {args.device}: median over {args.repeats} repeats of the trainer's steady-state "
            f"ms/step ({args.unet_steps} steps, windows of {args.log_every})",
            f"UNet channels {args.unet_channels}, mult {args.unet_mult}, {args.unet_res_blocks} res blocks, "
            f"attention at {args.unet_attention}; batch {args.unet_batch} of digits 16x16x1; "
            f"precision {unet_precision(args.device)}",
            step_table(results["unet"], variants),
        ]
    if "dit" in args.parts and args.device != "cuda":
        out.append("## DiT-B/2 step cost: skipped (needs --device cuda)")
    elif "dit" in args.parts:
        out += [
            f"## DiT-B/2 step cost: batch {DIT_BATCH} of random 32x32x4 latents, {DIT_CLASSES} classes, bf16, "
            f"{args.cuda_steps} steps timed after {DIT_WARMUP}",
            step_table(results["dit"], dit_variants(variants)),
        ]
    out += [f"note: {note}" for note in notes]
    out.append(f"every run: {args.out}")
    return "\n\n".join(out)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] %(message)s")
    torch.set_num_threads(args.threads)
    variants, notes = step_variants(args.device)
    results = measure(args, variants)
    print("\n" + report(args, results, variants, notes))


if __name__ == "__main__":
    main()
