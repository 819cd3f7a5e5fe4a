"""Fault injection: stop a real training run again and again, resume it each time, and check
that nothing was lost.

    python scripts/chaos.py --stops 20            # about 4 minutes on a laptop CPU

One small deterministic run (moons, an MLP, a checkpoint every optimizer step so that kills land
inside saves) is trained once uninterrupted for reference; then the same run is started, stopped
at a random moment by ``kill -9`` or SIGTERM, and resumed, ``--stops`` times, before it may finish.
On the way, one save meets a full disk (a file-size limit makes the kernel refuse the bytes) and
one ``last.pt`` is corrupted on disk. Printed: one row per stop, then the summary the issue asks
for: stops, resumes, steps lost, checkpoints unloadable, final weights equal to the reference.

Steps lost after a stop: the steps between the newest state the stopped process had written
(``last.pt`` or a checkpoint still pending its finite-loss check) plus the step in flight, and the
step the next process resumed from. For ``kill -9`` the step in flight is counted as lost even
when the kill came while the process was starting up: an upper bound. A SIGTERM that arrives
outside the training loop (start-up, the final evaluation) ends the process the default way
(exit -15); the trained weights are saved before the final evaluation.
"""

from __future__ import annotations

import argparse
import logging
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.checkpoint import load_checkpoint  # noqa: E402
from training.errors import UserError  # noqa: E402

log = logging.getLogger("chaos")

RUN = [
    "device=cpu",
    "deterministic=true",
    "trackio.enabled=false",
    "epochs=24",
    "dataloaders.num_train=4096",
    "dataloaders.batch_size=128",
    "dataloaders.num_eval=256",
    "eval.nfe=[2]",
    "eval.num_samples=256",
    "eval.every_epochs=0",
    "checkpoint.every_steps=1",
    "checkpoint.archive_every_epochs=1",
]


@dataclass
class Stop:
    kind: str  # kill -9 | SIGTERM
    after_s: float
    reached: int  # the newest step written (last.pt or pending) + the step in flight
    kept: int | None  # last.pt's step; None: unloadable or absent
    exit_code: int
    message: str


def launch(root: Path, name: str, resume: bool, limit_bytes: int | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "launcher.py", f"run_name={name}", f"paths.root={root}/outputs",
           f"paths.experiment_log={root}/EXPERIMENT_LOG.md", *RUN, *(["resume=true"] if resume else [])]  # fmt: skip

    def limit() -> None:  # in the child: a full disk, as the kernel reports it (EFBIG), for files it writes
        if limit_bytes is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, resource.RLIM_INFINITY))

    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=limit)  # fmt: skip


def ckpt_dir(root: Path, name: str) -> Path:
    return root / "outputs" / "ckpts" / "mlp" / name


def step_of(path: Path) -> int | None:
    try:
        return int(load_checkpoint(path, builds=False)["step"])
    except UserError:
        return None


def newest_written(folder: Path) -> int:
    steps = [step_of(p) for p in (folder / "last.pt", folder / ".last.pt.pending.tmp") if p.is_file()]
    return max([s for s in steps if s is not None], default=0)


def last_error(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.startswith("error: ")]
    return lines[-1] if lines else (stderr.strip().splitlines() or [""])[-1]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(folder / "last.pt", builds=False)
    return {**{f"model.{k}": v for k, v in state["model"].items()}, **{f"ema.{k}": v for k, v in state["ema"].items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stops", type=int, default=20, help="kill -9 and SIGTERM stops, in random order")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rng = random.Random(args.seed)
    root = args.out or Path(tempfile.mkdtemp(prefix="chaos_"))

    t0 = time.perf_counter()
    reference = launch(root, "reference", resume=False)
    first_write = None
    while reference.poll() is None:
        if first_write is None and any(ckpt_dir(root, "reference").glob(".last.pt*")):
            first_write = time.perf_counter() - t0
        time.sleep(0.02)
    _, err = reference.communicate()
    if reference.returncode or first_write is None:
        log.error("the reference run failed: %s", last_error(err))
        return 1
    startup_s, train_s = first_write, time.perf_counter() - t0 - first_write
    log.info("reference run: %.1f s to the first checkpoint, then %.1f s of training", startup_s, train_s)

    folder = ckpt_dir(root, "chaos")
    stops: list[Stop] = []
    resumes = failures = failed_resumes = 0
    disk_full = corrupted = ""
    started = False
    while True:
        if started and not disk_full and len(stops) == args.stops // 2:
            size = (folder / "last.pt").stat().st_size
            proc = launch(root, "chaos", resume=True, limit_bytes=size - 4096)  # the next save cannot fit
            _, err = proc.communicate()
            intact = step_of(folder / "last.pt") is not None
            disk_full = f"exit {proc.returncode}: {last_error(err)}; last.pt still loads: {intact}"
            resumes += 1
        if started and not corrupted and len(stops) == 3 * args.stops // 4:
            data = bytearray((folder / "last.pt").read_bytes())
            weight = max(load_checkpoint(folder / "last.pt", builds=False)["model"].values(), key=torch.numel)
            at = data.find(weight.numpy().tobytes())
            data[at : at + 64] = bytes(64)
            (folder / "last.pt").write_bytes(bytes(data))
            proc = launch(root, "chaos", resume=True)
            _, err = proc.communicate()
            message = last_error(err)
            corrupted = f"exit {proc.returncode}: {message}"
            good = message.rsplit("the last checkpoint that verifies is ", 1)[-1].split(" (copy it over")[0]
            if "is corrupted" not in message or not Path(good).is_file():
                log.error("the corrupted last.pt was not refused as it should be: %s", message)
                return 1
            shutil.copyfile(good, folder / "last.pt")  # what a user does with the file the message names
            resumes += 1
        proc = launch(root, "chaos", resume=started)
        resumes += started
        started = True
        if len(stops) >= args.stops:
            _, err = proc.communicate()
            if proc.returncode:
                log.error("the final resume failed: %s", last_error(err))
                return 1
            break
        # each process trains for a random share of ~2/stops of the run, some are stopped while starting
        after = startup_s + rng.uniform(-0.5, 2 * train_s / args.stops)
        kind = rng.choice(["kill -9", "SIGTERM"])
        try:
            proc.wait(timeout=after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL if kind == "kill -9" else signal.SIGTERM)
        _, err = proc.communicate()
        reached = newest_written(folder) + 1  # what it wrote (a kill leaves its pending file), + the step in flight
        if proc.returncode in (0, 1, 2):  # it ended on its own before the stop reached it
            failed_resumes += proc.returncode != 0
            log.info("the run ended before its stop (exit %d) %s", proc.returncode, last_error(err))
            continue
        kept = step_of(folder / "last.pt") if (folder / "last.pt").exists() else 0
        if kind == "SIGTERM" and proc.returncode == 143:
            reached = kept or reached  # it finished its step and wrote exactly that one
        elif kind == "SIGTERM":  # killed outside the training loop (starting up, or after its last step)
            reached = reached - 1  # no step was in flight
        failures += kept is None
        stops.append(Stop(kind, after, reached, kept, proc.returncode, last_error(err) if kind == "SIGTERM" else ""))

    equal = all(torch.equal(a, b) for a, b in zip(weights(ckpt_dir(root, "reference")).values(),
                                                       weights(folder).values(), strict=True))  # fmt: skip
    lost = [max(0, s.reached - (s.kept or 0)) for s in stops]
    print(f"\n{'#':>3} {'stop':>8} {'after s':>8} {'reached':>8} {'last.pt':>8} {'lost':>5} {'exit':>5}  message")
    for i, (s, n) in enumerate(zip(stops, lost, strict=False)):
        print(f"{i + 1:>3} {s.kind:>8} {s.after_s:>8.2f} {s.reached:>8} {s.kept!s:>8} {n:>5} {s.exit_code:>5}  "
              f"{s.message[:90]}")  # fmt: skip
    kinds = {k: sum(s.kind == k for s in stops) for k in ("kill -9", "SIGTERM")}
    rows = [
        ("stops", f"{len(stops)} ({kinds['kill -9']} kill -9, {kinds['SIGTERM']} SIGTERM)"),
        ("resumes", f"{resumes} ({failed_resumes} failed)"),
        ("steps lost (max / mean)", f"{max(lost, default=0)} / {sum(lost) / max(1, len(lost)):.2f}"),
        ("steps lost after SIGTERM", str(max((n for s, n in zip(stops, lost, strict=False) if s.kind == "SIGTERM"),
                                             default=0))),
        ("checkpoints unloadable", str(failures)),
        ("disk-full save", disk_full or "not reached"),
        ("corrupted last.pt on resume", corrupted or "not reached"),
        ("final weights equal to the uninterrupted run", "yes" if equal else "NO"),
    ]  # fmt: skip
    print(f"\n| {'check':<45} | result |\n| {'-' * 45} | --- |")
    for name, value in rows:
        print(f"| {name:<45} | {value} |")
    if args.out is None:
        shutil.rmtree(root)
    return 0 if equal and not failures and not failed_resumes else 1


if __name__ == "__main__":
    sys.exit(main())
