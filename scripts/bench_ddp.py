"""Training throughput in 1 vs N processes (torchrun, DDP) at the same global batch.

    python scripts/bench_ddp.py                 # CPU (gloo): 1 vs 2 processes, 2D demo and digits demo
    python scripts/bench_ddp.py --cuda          # also, on a GPU: DDP in 1 process vs plain

Each configuration is a fresh ``train(cfg)`` run (trackio off, evaluation shrunk) stopped after
``--steps`` optimizer steps; steps/s is the median of the logging windows after the first (which
holds start-up). The single process gets every core as threads, each of N processes cores/N, so
the comparison is at equal hardware. Scaling efficiency = N-process steps/s / (N x 1-process).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from training.benchmark import markdown_table, run_overrides

ROOT = Path(__file__).resolve().parents[1]
DEMOS = {
    "2d (MLP, moons)": ["dataloaders.batch_size=256", "dataloaders.num_train=20000"],
    "digits (UNet)": ["experiment=digits_unet_meanflow", "dataloaders.batch_size=64"],
}
STEPS = {"2d (MLP, moons)": 300, "digits (UNet)": 40}


def worker(overrides: list[str]) -> None:
    """One run (under torchrun: one rank of it); rank 0 prints its steady steps/s as JSON."""
    sys.path.insert(0, str(ROOT))
    from training.compose import compose_config
    from training.train import train

    metrics, _ = train(compose_config(overrides))
    if int(os.environ.get("RANK", "0")) == 0:
        print("BENCH " + json.dumps({"steps_per_s": 1000 / metrics["train/ms_per_step_steady"]}), flush=True)


def run(demo: str, processes: int, device: str, ddp: bool, out: Path) -> float:
    steps = STEPS[demo]
    overrides = [
        *run_overrides(f"bench_ddp_{processes}", device, out), f"max_steps={steps}", "epochs=1000",
        f"trainer.log_every={steps // 10}", "eval.num_samples=64", "eval.nfe=[1]", "eval.every_epochs=0",
        "checkpoint.every_epochs=1000", *DEMOS[demo],
    ]  # fmt: skip
    threads = max(1, (os.cpu_count() or 1) // processes) if device == "cpu" else 1
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    script = [str(Path(__file__).resolve()), "--worker", *overrides]
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if ddp else []
    done = subprocess.run([sys.executable, *launch, *script], env=env, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("BENCH ")]
    if done.returncode or not lines:
        raise SystemExit(f"{demo}, {processes} process(es) failed:\n{done.stderr[-3000:]}")
    return float(json.loads(lines[-1][6:])["steps_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--cuda", action="store_true", help="also DDP in 1 process vs plain on one GPU")
    parser.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker)
        return
    n = args.processes
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for demo in DEMOS:
            one = run(demo, 1, "cpu", ddp=False, out=Path(tmp))
            many = run(demo, n, "cpu", ddp=True, out=Path(tmp))
            rows.append((demo, "cpu/gloo", f"1 proc: {one:.1f}", f"{n} procs: {many:.1f}", f"{many / (n * one):.0%}"))
            if args.cuda:
                plain = run(demo, 1, "cuda", ddp=False, out=Path(tmp))
                wrapped = run(demo, 1, "cuda", ddp=True, out=Path(tmp))
                rows.append(
                    (demo, "cuda", f"plain: {plain:.1f}", f"DDP, 1 GPU: {wrapped:.1f}", f"{wrapped / plain:.0%}")
                )
    print(f"global batch fixed per demo; steps/s (median of logging windows); {os.cpu_count()} CPU cores")
    header = ("demo", "backend", "baseline steps/s", "distributed steps/s", "efficiency")
    print(markdown_table(header, rows, "llrrr"))


if __name__ == "__main__":
    main()
