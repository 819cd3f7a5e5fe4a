"""Flow matching on 2D toys, side by side with torchcfm: time per step and sample quality.

    python scripts/bench_2d.py                                    # the full benchmark
    python scripts/bench_2d.py --steps 50 --seeds 0 --datasets moons --losses fm   # smoke run

For each data set (moons, 8gaussians), loss (``fm``; ``fm_ot``, flow matching with minibatch OT
coupling) and seed, it trains our MLP through the real framework (the launcher's config,
``configs/train.yaml``, composed with overrides and run by ``training.train.train``) and, when
torchcfm is installed, torchcfm's README training loop in the same process. It prints the median
over seeds of ms/step and of the energy distance (ED) at NFE 1, 2, 4, 10, 100, then the ratios
ours/torchcfm against the targets of the benchmark issue: ms/step at most 0.8x torchcfm's, and
ED at NFE 100 no worse than torchcfm's. Every per-seed number goes to ``--out`` (JSON).

The shared setup is torchcfm's: an MLP of width 256 with three hidden layers, batch 256, Adam at
1e-3 with a constant rate, no gradient clipping, source x_0 ~ N(0, I), sigma = 0, ``--steps``
steps. Both models are then scored by our evaluator (``evaluation.energy_evaluator``): 5000 samples
integrated with our Euler solver from the same noise (its generator, seed 1234) and compared
with our energy distance to the same held-out set (``eval_set`` of the composed data config).
Both sides run with ``--threads`` torch threads and are seeded by ``seed_everything(seed)``; which
of the two trains first alternates from seed to seed, so neither always gets the warm process.

What was chosen to keep the comparison like for like, and what still differs:

- EMA. Our evaluator scores the EMA weights by default (``eval_use_ema=true``); torchcfm keeps no
  EMA. Each run is scored both ways from the same training: "ours" (raw weights, like for like
  with torchcfm) and "ours (EMA)" (decay 0.999, the framework's default). The quality target is
  judged on the default and, separately, on the raw weights. Our ms/step includes the EMA update.
- Data. torchcfm draws a fresh batch from its sampler every step; ours trains on a fixed set,
  sized here to ``steps * 256`` points (one epoch) so that every step sees fresh points too.
  Ours draws that set from ``dataloaders.toy2d`` (the same distributions as torchcfm's samplers)
  with the fixed ``data_seed``; torchcfm's batches follow the run seed.
- Time. Our ms/step is the trainer's own timer (``train/ms_per_step``): the whole training loop
  with the batch gather, the optimizer (the framework's default fused AdamW), LR-schedule and EMA
  steps, the NaN check and logging every ``log_every`` steps, and the progress bar; epoch-end
  checkpoints and evaluation are outside it. torchcfm's ms/step is ``time.perf_counter`` around
  its whole loop, data sampling included as in its README. Its ``sample_8gaussians`` builds a
  batch with a Python loop over the points, so the time spent sampling is also measured and the
  figure without it is shown beside ("excl. sampling"); the targets use the full figure.
- Models. Ours is ``models.mlp.MLP`` (SiLU, input ``[x, t, t - r]`` with r = t, so one input is
  always zero); torchcfm's is its ``MLP`` (SELU, input ``[x, t]``). Widths and depth match.
- Optimizer. Ours is the framework's default, fused AdamW with weight_decay 0, which is the same
  update as torchcfm's ``torch.optim.Adam`` computed in one kernel for all parameters.
- OT. Both solve the exact minibatch plan with POT's ``ot.emd``; ours permutes the noise along
  the plan, torchcfm samples pairs from the plan with replacement.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor, nn

from dataloaders.base import HeldOut
from evaluation.contract import EvalContext
from training.benchmark import (
    TOY_BATCH,
    TOY_EMA_DECAY,
    TOY_LR,
    TOY_WIDTH,
    environment,
    markdown_table,
    medians_by,
    rotated,
    run_config,
    toy_overrides,
    verdict,
    write_report,
)
from training.seeding import seed_everything
from training.train import train

log = logging.getLogger("bench_2d")

DATASETS = ("moons", "8gaussians")
LOSSES = ("fm", "fm_ot")
NFE = (1, 2, 4, 10, 100)
EVAL_SAMPLES = 5000
SPEED_TARGET = 0.8  # ours' ms/step at most this multiple of torchcfm's
HAS_TORCHCFM = importlib.util.find_spec("torchcfm") is not None

OURS, OURS_EMA, TORCHCFM = "ours", "ours (EMA)", "torchcfm"


@dataclass
class Result:
    """One trained model scored at every NFE (``energy_distance[nfe]``).

    ``ms_per_step_excl_sampling`` is torchcfm's time without drawing its batches; None for ours,
    whose (cheap) batch gather is inside the trainer's timer.
    """

    dataset: str
    loss: str
    impl: str
    seed: int
    ms_per_step: float
    energy_distance: dict[int, float]
    final_loss: float
    ms_per_step_excl_sampling: float | None = None


# --- our framework ----------------------------------------------------------------------------
def bench_config(dataset: str, loss: str, seed: int, steps: int, device: str, root: Path) -> DictConfig:
    """The launcher's config for one run in torchcfm's setup, every output under ``root``."""
    overrides = [
        *toy_overrides(dataset, steps, EVAL_SAMPLES, NFE),
        f"loss={loss}",
        "solver=euler",
        "eval_use_ema=false",  # torchcfm has no EMA; the EMA weights are scored separately
        f"seed={seed}",
    ]
    return run_config(f"bench_{dataset}_{loss}_s{seed}", overrides, device, root)


def energy_distances(metrics: dict[str, float]) -> dict[int, float]:
    return {n: metrics[f"eval/energy_distance@nfe{n}"] for n in NFE}


def run_ours(cfg: DictConfig, dataset: str, loss: str, reference: Tensor) -> list[Result]:
    """Train with ``train(cfg)``; score its raw weights (as trained) and its EMA weights."""
    metrics, objects = train(cfg)
    if not torch.equal(objects["data"].eval_set, reference):
        raise RuntimeError("our run was scored on another held-out set than torchcfm's")
    ema_metrics = instantiate(cfg.eval)(
        objects["ema"].module, objects["solver"], HeldOut(reference), EvalContext(torch.device(cfg.device))
    )
    raw = Result(
        dataset=dataset,
        loss=loss,
        impl=OURS,
        seed=int(cfg.seed),
        ms_per_step=metrics["train/ms_per_step"],
        energy_distance=energy_distances(metrics),
        final_loss=metrics["train/final_loss"],
    )
    return [raw, replace(raw, impl=OURS_EMA, energy_distance=energy_distances(ema_metrics))]


# --- torchcfm ---------------------------------------------------------------------------------
class TorchCFMVelocity(nn.Module):
    """torchcfm's ``MLP`` on ``[x, t]`` behind our model contract ``model(x, t, r, cond)``.

    Our sampler turns it into the solver's ``velocity(x, t)`` (``evaluation.sample_generation.velocity_of``)
    exactly as it does our models; r is unused, as in flow matching r = t.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, t: Tensor, r: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.net(torch.cat([x, t[:, None].to(x.dtype)], dim=1))  # (B, 2)


def run_torchcfm(cfg: DictConfig, dataset: str, loss: str, reference: Tensor, steps: int) -> Result:
    """torchcfm's README loop with fresh batches from its own samplers, scored by our evaluator."""
    from torchcfm.conditional_flow_matching import (
        ConditionalFlowMatcher,
        ExactOptimalTransportConditionalFlowMatcher,
    )
    from torchcfm.models.models import MLP
    from torchcfm.utils import sample_8gaussians, sample_moons

    device = torch.device(cfg.device)
    sample_x1 = {"moons": sample_moons, "8gaussians": sample_8gaussians}[dataset]
    matcher = {"fm": ConditionalFlowMatcher, "fm_ot": ExactOptimalTransportConditionalFlowMatcher}[loss](sigma=0.0)
    seed_everything(int(cfg.seed), deterministic=False)
    model = MLP(dim=2, w=TOY_WIDTH, time_varying=True).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=TOY_LR)
    model.train()
    sampling = 0.0
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad()
        before = time.perf_counter()
        x1 = sample_x1(TOY_BATCH).float().to(device)
        sampling += time.perf_counter() - before
        x0 = torch.randn_like(x1)
        t, xt, ut = matcher.sample_location_and_conditional_flow(x0, x1)
        vt = model(torch.cat([xt, t[:, None]], dim=-1))
        loss_value = torch.mean((vt - ut) ** 2)
        loss_value.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    metrics = instantiate(cfg.eval)(
        TorchCFMVelocity(model), instantiate(cfg.solver), HeldOut(reference), EvalContext(device)
    )
    return Result(
        dataset=dataset,
        loss=loss,
        impl=TORCHCFM,
        seed=int(cfg.seed),
        ms_per_step=1000 * seconds / steps,
        energy_distance=energy_distances(metrics),
        final_loss=loss_value.item(),
        ms_per_step_excl_sampling=1000 * (seconds - sampling) / steps,
    )


# --- one cell of the grid -----------------------------------------------------------------------
def bench_one(dataset: str, loss: str, seed: int, steps: int, device: str, root: Path, turn: int) -> list[Result]:
    """Ours and torchcfm (when installed) in the order of ``turn``: each gets the warm process in turn."""
    cfg = bench_config(dataset, loss, seed, steps, device, root)
    reference = instantiate(cfg.dataloaders).eval_set  # the held-out set our run is scored on
    runs: list[Callable[[], list[Result]]] = [partial(run_ours, cfg, dataset, loss, reference)]
    if HAS_TORCHCFM:
        runs.append(lambda: [run_torchcfm(cfg, dataset, loss, reference, steps)])
    results = [r for run in rotated(runs, turn) for r in run()]
    for r in results:
        log.info("%s %s %s seed %d: %.3f ms/step, ED@nfe%d %.4g", r.dataset, r.loss, r.impl, r.seed, r.ms_per_step,
                 NFE[-1], r.energy_distance[NFE[-1]])  # fmt: skip
    return results


# --- tables -----------------------------------------------------------------------------------
Summary = dict[tuple[str, str, str], dict[str, Any]]  # (dataset, loss, impl) -> medians over seeds


def summarize(results: list[Result]) -> Summary:
    fields = ("ms_per_step", "ms_per_step_excl_sampling", "energy_distance")
    return medians_by(results, lambda r: (r.dataset, r.loss, r.impl), fields)


def results_table(summary: Summary) -> str:
    rows = []
    for (dataset, loss, impl), s in summary.items():
        if impl == OURS_EMA:
            ms = "(same run)"
        elif impl == TORCHCFM:
            ms = f"{s['ms_per_step']:.3f} ({s['ms_per_step_excl_sampling']:.3f} excl. sampling)"
        else:
            ms = f"{s['ms_per_step']:.3f}"
        rows.append([dataset, loss, impl, ms, *(f"{s['energy_distance'][n]:.4g}" for n in NFE)])
    header = ["dataset", "loss", "implementation", "ms/step", *(f"ED@NFE{n}" for n in NFE)]
    return markdown_table(header, rows, "lllr" + "r" * len(NFE))


def ratio_table(summary: Summary) -> str:
    """Ours/torchcfm per (dataset, loss), each target marked PASS/FAIL.

    The quality target is judged on what the framework evaluates by default (EMA weights); the
    raw-weight ratio, the like-for-like one, is shown and judged beside it.
    """
    last = NFE[-1]
    header = [
        "dataset", "loss", "ms/step ours/torchcfm", f"<= {SPEED_TARGET}",
        f"ED@NFE{last} ours (EMA, default)/torchcfm", "<= 1",
        f"ED@NFE{last} ours (raw)/torchcfm", "<= 1",
        "ms/step ours/torchcfm excl. its sampling",
    ]  # fmt: skip
    rows = []
    for (dataset, loss, impl), theirs in summary.items():
        if impl != TORCHCFM:
            continue
        ours, ema = summary[(dataset, loss, OURS)], summary[(dataset, loss, OURS_EMA)]
        speed = ours["ms_per_step"] / theirs["ms_per_step"]
        quality_ema = ema["energy_distance"][last] / theirs["energy_distance"][last]
        quality_raw = ours["energy_distance"][last] / theirs["energy_distance"][last]
        rows.append([
            dataset, loss,
            f"{speed:.3f}", verdict(speed, SPEED_TARGET),
            f"{quality_ema:.3f}", verdict(quality_ema, 1),
            f"{quality_raw:.3f}", verdict(quality_raw, 1),
            f"{ours['ms_per_step'] / theirs['ms_per_step_excl_sampling']:.3f}",
        ])  # fmt: skip
    return markdown_table(header, rows, "llrcrcrcr")


def settings(args: argparse.Namespace) -> dict[str, object]:
    """The run's settings stored beside its numbers."""
    return {
        "steps": args.steps,
        "seeds": args.seeds,
        "datasets": args.datasets,
        "losses": args.losses,
        "device": args.device,
        "threads": args.threads,
        "batch": TOY_BATCH,
        "width": TOY_WIDTH,
        "lr": TOY_LR,
        "eval_samples": EVAL_SAMPLES,
        "nfe": list(NFE),
        "ema_decay": TOY_EMA_DECAY,
        "torchcfm": importlib.import_module("torchcfm").__version__ if HAS_TORCHCFM else None,
    }


def warm_up(device: torch.device, steps: int = 20) -> None:
    """Untimed training steps first, so that neither side's timer pays for starting the thread
    pool, the CUDA context or cuBLAS (on CUDA that is tens of ms per step over a short run)."""
    net = nn.Sequential(nn.Linear(3, TOY_WIDTH), nn.SiLU(), nn.Linear(TOY_WIDTH, 2)).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=TOY_LR)
    for _ in range(steps):
        optimizer.zero_grad()
        net(torch.randn(TOY_BATCH, 3, device=device)).square().mean().backward()
        optimizer.step()
    torch.cdist(torch.randn(TOY_BATCH, 2, device=device), torch.randn(TOY_BATCH, 2, device=device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3000, help="training steps per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    p.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES))
    p.add_argument("--device", default="cpu", help="cpu | cuda | mps, for both implementations")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for both implementations")
    p.add_argument("--out", type=Path, default=Path("outputs/bench_2d.json"), help="per-seed results (JSON)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] %(message)s")
    torch.set_num_threads(args.threads)
    if not HAS_TORCHCFM:
        log.warning("torchcfm is not installed (pip install -e '.[bench]'): timing ours only, no ratios")
    warm_up(torch.device(args.device))
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bench_2d_") as tmp:
        for dataset in args.datasets:
            for loss in args.losses:
                for turn, seed in enumerate(args.seeds):
                    results += bench_one(dataset, loss, seed, args.steps, args.device, Path(tmp), turn)
                    write_report(args.out, environment(settings(args), args.device), runs=results)
    summary = summarize(results)
    print(f"\n{args.steps} steps, seeds {args.seeds}, {args.device}, {args.threads} threads")
    print("medians over seeds\n")
    print(results_table(summary))
    if HAS_TORCHCFM:
        print()
        print(ratio_table(summary))
    print(f"\nper-seed results: {args.out}")


if __name__ == "__main__":
    main()
