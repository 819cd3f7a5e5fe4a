"""Our image models next to diffusers' at equal size: a flow-matching step, a MeanFlow step and a
10-step sampling pass, timed side by side in one process.

    python scripts/bench_models.py                                   # CPU, fp32: the UNet and DiT-S/2 pairs
    python scripts/bench_models.py --device cuda                     # + bf16 and torch.compile rows, DiT-B/2 MFU
    python scripts/bench_models.py --pairs unet --repeats 3 --steps 2    # a quick look

Pairs (``--pairs``):

``unet``: ``models.unet.UNet`` (``--unet-channels`` 32, mult 1-2, ``--unet-res-blocks`` 2 residual blocks a
level, attention at 8x8 with 4 heads, 10 classes) against diffusers' ``UNet2DModel`` of the same layout
(``DownBlock2D, AttnDownBlock2D``, scale-shift time conditioning, head dim 16, 11 class embeddings: 10
and the null class), on 16x16x1 images (digits' shape). Ours has 7% more parameters (its second time
embedder, for MeanFlow's t - r); the table prints both counts and fails a pair outside ±10%.

``dit``: ``models.dit.DiT`` at DiT-S/2's width and depth (384, 12 blocks, 6 heads, patch 2) against
diffusers' ``DiTTransformer2DModel`` with the same (adaLN-Zero), on ``--dit-size`` latents with 4 channels.

Workloads, each a whole optimizer step of the framework's own loss (``loss=fm``, ``loss=meanflow`` as
composed from configs/) with AdamW, or a sampling pass of the framework's Euler solver: ``fm``,
``meanflow`` (the default selective jvp on the 25% of samples with r != t) and ``sample x10``. diffusers'
models take (x, t, label); they sit behind the same ``v(x, t, r, cond)`` call with r unused, so a
MeanFlow step costs them a forward, a jvp and a backward as it costs ours. ``fm, checkpointed`` runs ours
with ``activation_checkpointing=true``: its time and the memory it saves.

Within a repeat every model/workload runs once, in an order rotated each repeat; a ratio is taken within
a repeat and the median over repeats is reported. Memory is the peak of one more step above what was
held before it (CPU: the process's RSS high-water mark, reset before the step; CUDA: max allocated).
Targets: ours / diffusers <= 1.0 for every training row, MeanFlow / FM <= 1.2 on our UNet.

``--device cuda`` times fp32 and bf16 (the ``precision`` presets) and bf16 under ``torch.compile``,
and measures DiT-B/2's model FLOPs utilisation: FLOPs of a bf16 step counted by
``torch.utils.flop_counter.FlopCounterMode``, over its time, against the GPU's dense bf16 peak
(``--peak-tflops``, or the table below for known GPUs). Every number goes to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import logging
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from diffusers import DiTTransformer2DModel, UNet2DModel
from hydra.utils import instantiate
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from models.dit import DiT
from models.unet import UNet
from solvers.base import uniform_grid
from solvers.fixed_step import Euler
from training.benchmark import (
    current_memory_mb,
    environment,
    markdown_table,
    peak_memory_mb,
    precision_preset,
    reset_peak_memory,
    side_by_side,
    verdict,
    write_report,
)
from training.compose import compose_config
from training.precision import Precision

log = logging.getLogger("bench_models")

NUM_CLASSES = 10
SAMPLING_STEPS = 10
STEP_TARGET = 1.0  # ours / diffusers
MEANFLOW_TARGET = 1.2  # MeanFlow / FM on our UNet
PARAMS_TOLERANCE = 0.10
MFU_TARGET = 0.40
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}  # dense, SXM where both


# --- diffusers' models behind our model contract ----------------------------------------------------
class Diffusers(nn.Module):
    """A diffusers model called ``net(x, timestep, class_labels=...)`` (``UNet2DModel``,
    ``DiTTransformer2DModel``) as ``v(x, t, r, cond)``: time scaled to its 0-1000 range, the null
    class its label table's last row."""

    def __init__(self, net: UNet2DModel | DiTTransformer2DModel):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, t: Tensor, r: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.net(x, 1000 * t, class_labels=null_last(cond, len(x), x.device)).sample


def null_last(cond: Tensor | None, batch: int, device: torch.device) -> Tensor:
    """Labels with the null class (None, or -1 from condition dropout) as index ``NUM_CLASSES``."""
    if cond is None:
        return torch.full((batch,), NUM_CLASSES, device=device, dtype=torch.long)
    return torch.where(cond < 0, NUM_CLASSES, cond)


# --- the pairs -------------------------------------------------------------------------------------
@dataclass
class Pair:
    name: str
    ours: Callable[[bool], nn.Module]  # activation_checkpointing -> model
    theirs: Callable[[], nn.Module]
    shape: tuple[int, int, int]  # C, H, W
    batch: int


def unet_pair(args: argparse.Namespace) -> Pair:
    c = args.unet_channels

    def ours(checkpointing: bool) -> nn.Module:
        return UNet(in_channels=1, image_size=16, channels=c, channel_mult=(1, 2), num_res_blocks=args.unet_res_blocks,
                    attention_resolutions=(8,), dropout=0.0, num_heads=4, norm_groups=8, num_classes=NUM_CLASSES,
                    activation_checkpointing=checkpointing)  # fmt: skip

    def theirs() -> nn.Module:
        return Diffusers(UNet2DModel(
            sample_size=16, in_channels=1, out_channels=1, block_out_channels=(c, 2 * c),
            layers_per_block=args.unet_res_blocks, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=2 * c // 4,
            num_class_embeds=NUM_CLASSES + 1, resnet_time_scale_shift="scale_shift",
        ))  # fmt: skip

    return Pair("UNet", ours, theirs, (1, 16, 16), args.unet_batch)


def dit_pair(args: argparse.Namespace, width: int, depth: int, heads: int, size: int, batch: int) -> Pair:
    def ours(checkpointing: bool) -> nn.Module:
        return DiT(input_size=size, patch_size=2, in_channels=4, hidden_size=width, depth=depth, num_heads=heads,
                   num_classes=NUM_CLASSES, activation_checkpointing=checkpointing)  # fmt: skip

    def theirs() -> nn.Module:
        return Diffusers(DiTTransformer2DModel(
            num_attention_heads=heads, attention_head_dim=width // heads, in_channels=4, out_channels=4,
            num_layers=depth, sample_size=size, patch_size=2, num_embeds_ada_norm=NUM_CLASSES,
        ))  # fmt: skip

    return Pair(f"DiT ({width}x{depth})", ours, theirs, (4, size, size), batch)


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- workloads -------------------------------------------------------------------------------------
@dataclass
class Setting:
    """One precision (a ``precision`` preset) and whether the model is compiled."""

    precision: str
    compiled: bool = False

    @property
    def label(self) -> str:
        return self.precision + (" + compile" if self.compiled else "")


def losses() -> dict[str, Any]:
    """The framework's losses as its configs build them."""
    return {name: instantiate(compose_config([f"loss={name}"]).loss) for name in ("fm", "meanflow")}


def batch_of(pair: Pair, device: torch.device, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(pair.batch, *pair.shape, generator=g)
    return {"x1": x1.to(device), "cond": torch.randint(0, NUM_CLASSES, (pair.batch,), generator=g).to(device)}


def train_step(model: nn.Module, loss_fn: Any, data: dict[str, Tensor], precision: Precision,
               device: torch.device) -> Callable[[], None]:  # fmt: skip
    """One optimizer step as the trainer takes it: autocast, (scaled) backward, clipping, AdamW."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = precision.grad_scaler_for(device)

    def step() -> None:
        with precision.autocast_context(device):
            loss = loss_fn(model, data).loss
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return step


def sampling_pass(model: nn.Module, data: dict[str, Tensor], precision: Precision,
                  device: torch.device) -> Callable[[], None]:  # fmt: skip
    """``SAMPLING_STEPS`` Euler steps from noise, as evaluation samples."""
    solver, grid = Euler(), uniform_grid(SAMPLING_STEPS, device)
    cond = data["cond"]

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        times = t.expand(len(x))
        return model(x, times, times, cond)

    def run() -> None:
        with torch.inference_mode(), precision.autocast_context(device):
            solver(velocity, torch.randn_like(data["x1"]), grid)

    return run


@dataclass
class Row:
    pair: str
    setting: str
    workload: str
    ms: dict[str, list[float]] = field(default_factory=dict)  # model -> seconds per repeat (ms)
    peak_mb: dict[str, float] = field(default_factory=dict)


def workloads(pair: Pair, setting: Setting, device: torch.device) -> dict[tuple[str, str], Callable[[], None]]:
    """(model, workload) -> one call; every model built from the same seed."""
    precision = precision_preset(setting.precision, device)
    data, loss = batch_of(pair, device), losses()
    fns: dict[tuple[str, str], Callable[[], None]] = {}
    for who, build in (("ours", lambda: pair.ours(False)), ("diffusers", pair.theirs),
                       ("ours, checkpointed", lambda: pair.ours(True))):  # fmt: skip
        torch.manual_seed(0)
        built = build().to(device).train()
        model = cast(nn.Module, torch.compile(built)) if setting.compiled else built  # an OptimizedModule
        if who == "ours, checkpointed":
            fns[("ours", "fm, checkpointed")] = train_step(model, loss["fm"], data, precision, device)
            continue
        for name, loss_fn in loss.items():
            fns[(who, name)] = train_step(model, loss_fn, data, precision, device)
        fns[(who, f"sample x{SAMPLING_STEPS}")] = sampling_pass(model, data, precision, device)
    return fns


def measure(pair: Pair, setting: Setting, args: argparse.Namespace) -> list[Row]:
    device = torch.device(args.device)
    fns = workloads(pair, setting, device)
    for fn in fns.values():  # warm-up: allocation, kernel choice, compilation
        for _ in range(args.warmup):
            fn()

    def repeated(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(args.steps):
                fn()

        return run

    seconds, _ = side_by_side({key: repeated(fn) for key, fn in fns.items()}, args.repeats, device)
    rows: dict[str, Row] = {}
    for (who, workload), fn in fns.items():
        row = rows.setdefault(workload, Row(pair.name, setting.label, workload))
        row.ms[who] = [1000 * s / args.steps for s in seconds[(who, workload)]]
        row.peak_mb[who] = step_memory_mb(fn, device)
    log.info("%s, %s: %s", pair.name, setting.label,
             {w: {k: round(statistics.median(v), 1) for k, v in r.ms.items()} for w, r in rows.items()})  # fmt: skip
    return list(rows.values())


def step_memory_mb(fn: Callable[[], None], device: torch.device) -> float:
    """The peak one more call reaches above what was held before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    reset_peak_memory(device)  # on the CPU this first returns freed memory to the system: read what is held after it
    before = current_memory_mb(device)
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return peak_memory_mb(device) - before


# --- DiT-B/2 model FLOPs utilisation (CUDA) --------------------------------------------------------
@dataclass
class Utilisation:
    workload: str
    ms: float
    tflop_per_step: float
    tflops: float
    mfu: float | None


def peak_tflops(args: argparse.Namespace) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    name = torch.cuda.get_device_name()
    return next((peak for gpu, peak in BF16_PEAK_TFLOPS.items() if gpu in name), None)


def utilisation(args: argparse.Namespace) -> list[Utilisation]:
    """DiT-B/2 on 32x32x4 latents, bf16: counted FLOPs of one step over its median time."""
    device = torch.device("cuda")
    pair = dit_pair(args, 768, 12, 12, 32, args.mfu_batch)
    precision = precision_preset("bf16", device)
    data, peak = batch_of(pair, device), peak_tflops(args)
    out = []
    for name, loss_fn in losses().items():
        torch.manual_seed(0)
        step = train_step(pair.ours(False).to(device).train(), loss_fn, data, precision, device)
        for _ in range(args.warmup):
            step()
        with FlopCounterMode(display=False) as counter:
            step()
        seconds, _ = side_by_side({name: step}, args.repeats * args.steps, device)
        ms = 1000 * statistics.median(seconds[name])
        tflop = counter.get_total_flops() / 1e12
        out.append(
            Utilisation(name, ms, tflop, tflop / (ms / 1000), None if peak is None else tflop / (ms / 1000) / peak)
        )
    return out


# --- tables ----------------------------------------------------------------------------------------
def ratio(row: Row, a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(row.ms[a], row.ms[b], strict=True))


def pair_table(rows: list[Row]) -> str:
    out = []
    for r in rows:
        theirs = "diffusers" in r.ms
        median_ms = {k: statistics.median(v) for k, v in r.ms.items()}
        value = ratio(r, "ours", "diffusers") if theirs else None
        judged = theirs and not r.workload.startswith("sample")
        out.append([
            r.pair, r.setting, r.workload, f"{median_ms['ours']:.1f}",
            f"{median_ms['diffusers']:.1f}" if theirs else "", "" if value is None else f"{value:.3f}",
            f"{r.peak_mb['ours']:.0f}", f"{r.peak_mb['diffusers']:.0f}" if theirs else "",
            verdict(value, STEP_TARGET) if judged and value is not None else "",
        ])  # fmt: skip
    header = ["model", "precision", "workload", "ours ms", "diffusers ms", "ours / diffusers", "ours MB",
              "diffusers MB", f"<= {STEP_TARGET}"]  # fmt: skip
    return markdown_table(header, out, "lllrrrrrc")


def meanflow_table(rows: list[Row]) -> str:
    """MeanFlow's step over flow matching's, within each repeat, for both models of each pair."""
    by = {(r.pair, r.setting, r.workload): r for r in rows}
    out = []
    for (pair, setting, workload), mf in by.items():
        if workload != "meanflow":
            continue
        fm = by[(pair, setting, "fm")]
        for who in ("ours", "diffusers"):
            value = statistics.median(a / b for a, b in zip(mf.ms[who], fm.ms[who], strict=True))
            judged = who == "ours" and pair == "UNet"
            out.append([pair, setting, who, f"{value:.3f}", verdict(value, MEANFLOW_TARGET) if judged else ""])
    return markdown_table(["model", "precision", "of", "MeanFlow / FM", f"<= {MEANFLOW_TARGET}"], out, "lllrc")


def checkpointing_table(rows: list[Row]) -> str:
    by = {(r.pair, r.setting, r.workload): r for r in rows}
    out = []
    for (pair, setting, workload), r in by.items():
        if workload != "fm, checkpointed":
            continue
        fm = by[(pair, setting, "fm")]
        plain = fm.peak_mb["ours"]
        saved = f"{100 * (1 - r.peak_mb['ours'] / plain):.0f}%" if plain > 0 else ""  # 0: below a page's resolution
        slower = statistics.median(a / b for a, b in zip(r.ms["ours"], fm.ms["ours"], strict=True))
        out.append([pair, setting, f"{plain:.0f}", f"{r.peak_mb['ours']:.0f}", saved, f"{slower:.2f}"])
    header = ["model", "precision", "FM step MB", "checkpointed MB", "memory saved", "time / plain"]
    return markdown_table(header, out, "llrrrr")


def params_table(pairs: list[Pair]) -> str:
    out = []
    for p in pairs:
        ours, theirs = parameters(p.ours(False)), parameters(p.theirs())
        ok = abs(ours / theirs - 1) <= PARAMS_TOLERANCE
        out.append([p.name, f"{ours / 1e6:.3f}M", f"{theirs / 1e6:.3f}M", f"{ours / theirs:.3f}",
                    "PASS" if ok else "FAIL", f"{p.batch} x {'x'.join(map(str, p.shape))}"])  # fmt: skip
    return markdown_table(["model", "ours", "diffusers", "ratio", "within ±10%", "batch"], out, "lrrrcl")


def mfu_table(results: list[Utilisation]) -> str:
    out = [[u.workload, f"{u.ms:.1f}", f"{u.tflop_per_step:.2f}", f"{u.tflops:.0f}",
            "" if u.mfu is None else f"{100 * u.mfu:.1f}%",
            "" if u.mfu is None or u.workload != "meanflow" else ("PASS" if u.mfu >= MFU_TARGET else "FAIL")]
           for u in results]  # fmt: skip
    return markdown_table(
        ["workload", "ms/step", "TFLOP/step", "TFLOP/s", "MFU", f">= {MFU_TARGET:.0%}"], out, "lrrrrc"
    )


# --- driver ----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", nargs="+", choices=("unet", "dit"), default=["unet", "dit"])
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU)")
    p.add_argument("--repeats", type=int, default=5, help="rounds of every model and workload, in rotating order")
    p.add_argument("--steps", type=int, default=2, help="calls timed together in one round")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls of each before the first round")
    p.add_argument("--unet-channels", type=int, default=32)
    p.add_argument("--unet-res-blocks", type=int, default=2)
    p.add_argument("--unet-batch", type=int, default=128)
    p.add_argument("--dit-width", type=int, default=384, help="DiT-S: 384")
    p.add_argument("--dit-depth", type=int, default=12)
    p.add_argument("--dit-heads", type=int, default=6)
    p.add_argument("--dit-size", type=int, default=16, help="latent height and width")
    p.add_argument("--dit-batch", type=int, default=32)
    p.add_argument("--mfu-batch", type=int, default=64, help="DiT-B/2 batch for the utilisation rows (CUDA)")
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if not in the built-in table")
    p.add_argument("--out", type=Path, default=Path("outputs/bench_models.json"))
    return p.parse_args(argv)


def settings(device: str) -> list[Setting]:
    if device == "cuda":
        return [Setting("fp32"), Setting("bf16"), Setting("bf16", compiled=True)]
    return [Setting("fp32")]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] %(message)s")
    torch.set_num_threads(args.threads)
    pairs = [unet_pair(args) if name == "unet" else
             dit_pair(args, args.dit_width, args.dit_depth, args.dit_heads, args.dit_size, args.dit_batch)
             for name in args.pairs]  # fmt: skip
    rows: list[Row] = []
    mfu: list[Utilisation] = []
    env = environment(vars(args), args.device)
    for pair in pairs:
        for setting in settings(args.device):
            rows += measure(pair, setting, args)
            write_report(args.out, env, rows=rows)
    if args.device == "cuda":
        mfu = utilisation(args)
        write_report(args.out, env, rows=rows, mfu=mfu)
    where = args.device + (
        f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else f", {args.threads} thread(s)"
    )
    sections = [
        f"{where}, torch {torch.__version__}; median over {args.repeats} repeats of {args.steps} calls",
        "## Parameters", params_table(pairs),
        "## Time and memory (memory: peak of one more call above what was held)", pair_table(rows),
        "## MeanFlow step over flow-matching step", meanflow_table(rows),
        "## Activation checkpointing (ours, FM step)", checkpointing_table(rows),
    ]  # fmt: skip
    if mfu:
        sections += [f"## DiT-B/2 bf16 utilisation, batch {args.mfu_batch} of 32x32x4 latents", mfu_table(mfu)]
    sections.append(f"every number: {args.out}")
    print("\n\n".join(sections))


if __name__ == "__main__":
    main()
