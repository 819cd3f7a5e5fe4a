"""DenoisingZoo entry point: compose the Hydra config and train (or evaluate) one run.

python launcher.py run_name=NAME [group=option ...] [key=value ...]
python launcher.py -m run_name=sweep seed=0,1,2      # one job per combination; summary.md in the sweep dir
python launcher.py -m hparams_search=moons_optuna run_name=hp   # Optuna minimises `optimized_metric`
python launcher.py --help                             # groups, options and defaults

In a sweep (-m) a failing job is recorded (failed.txt in its run directory, a row in the summary)
and the other jobs go on; the process exits 1 at the end if any job failed.
"""

from __future__ import annotations

import difflib
import itertools
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType, ValueType
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf

from training.distributed import needs_relaunch, relaunch_with_torchrun
from training.errors import RunInterrupted, UserError
from training.outputs import metrics_table, run_name_problem
from training.sweep_summary import job_run_name, maximizes, record_failure
from training.train import train

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
PRIMARY_CONFIG_FLAGS = ("--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd")
ENUMERABLE = (ValueType.SIMPLE_CHOICE_SWEEP, ValueType.CHOICE_SWEEP, ValueType.RANGE_SWEEP)
MAX_KEY_CHECK_COMPOSES = 8  # a sweep over groups composes each combination, up to this many
log = logging.getLogger("launcher")


def translate_flags(argv: list[str]) -> list[str]:
    """The notes' argparse-style ``--backend NAME`` (or ``--backend=NAME``) as the override ``backend=NAME``,
    and ``--detach`` (a Modal run that outlives the local terminal) as ``backend.detach=true``."""
    out: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg.startswith("--backend="):
            out.append("backend=" + arg.removeprefix("--backend="))
        elif arg == "--backend":
            name = next(args, None)
            out.append(f"backend={name}" if name is not None else arg)  # no name: Hydra rejects the bare flag
        elif arg == "--detach":
            out.append("backend.detach=true")
        else:
            out.append(arg)
    return out


def check_run_name(argv: list[str]) -> str | None:
    """A ``run_name`` that is not a plain folder name, before Hydra makes its run folder from it."""
    for arg in argv:
        if arg.lstrip("+").startswith("run_name=") and "(" not in arg:  # choice(...), range(...): Hydra's
            for name in arg.lstrip("+").removeprefix("run_name=").split(","):  # a sweep over names: each one
                if problem := run_name_problem(name):
                    return problem
    return None


def check_group_options(argv: list[str], config_dir: Path = CONFIG_DIR) -> str | None:
    """The first ``group=option`` whose option has no YAML file, as a one-line message.

    Hydra's own message spans a dozen lines; this names the group, the bad option and the valid ones.
    """
    for arg in argv:
        if arg.startswith(("-", "+", "~")) or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        group = config_dir / key
        if key.split("/")[0] == "hydra" or not group.is_dir() or "(" in value:
            continue
        valid = sorted(p.stem for p in group.glob("*.yaml"))
        for option in value.split(","):
            if option and option != "null" and option not in valid:
                return f"unknown {key} option '{option}'; valid options: {', '.join(valid)}"
    return None


def _flat_keys(node: Any, prefix: str = "") -> list[str]:
    if not isinstance(node, dict):
        return []
    keys = []
    for k, v in node.items():
        keys += [f"{prefix}{k}", *_flat_keys(v, f"{prefix}{k}.")]
    return keys


def _has_key(cfg: DictConfig, key: str) -> bool:
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if isinstance(parent, ListConfig):
        return True  # an index into a list: Hydra checks it
    return isinstance(parent, DictConfig) and leaf in parent.keys()  # keys(): also a missing (???) value


def unknown_key_message(key: str, cfgs: list[DictConfig], where: str) -> str:
    """One line naming the key and the closest existing one (same last name first, then spelling)."""
    trees = [OmegaConf.to_container(cfg, resolve=False) for cfg in cfgs]
    keys = list(
        dict.fromkeys(k for t in trees if isinstance(t, dict) for k in _flat_keys(t) if k.split(".")[0] != "hydra")
    )
    leaf = key.rpartition(".")[2]
    close = [k for k in keys if k.rpartition(".")[2] == leaf] or difflib.get_close_matches(key, keys, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"{where} names no config key '{key}'{hint} (+{key}=... adds a new key)"


def _is_group(o: Override, config_dir: Path) -> bool:
    key = o.key_or_group
    return o.package is not None or key.startswith("hydra/") or (config_dir / key).is_dir()


def _group_options(o: Override) -> list[str]:
    if not o.is_sweep_override():
        return [str(o.input_line)]
    return [f"{o.get_key_element()}={option}" for option in o.sweep_string_iterator()]


def check_override_keys(argv: list[str], config_dir: Path = CONFIG_DIR) -> str | None:
    """The first ``key=value`` override (or Optuna search-space key) that names no config key, as one line.

    Hydra would stop on it too, but only once that job's config is composed, in a dozen lines. The
    config is composed with the command line's group options (each combination of a sweep over
    groups, up to a few), so keys that an experiment or a model option brings count.
    """
    if any(arg.split("=")[0] in PRIMARY_CONFIG_FLAGS for arg in argv):
        return None  # another primary config: Hydra checks it
    lines = [arg for arg in argv if "=" in arg and not arg.startswith("-")]
    try:
        overrides = OverridesParser.create().parse_overrides(lines)
        groups = [o for o in overrides if _is_group(o, config_dir)]
        if any(o.is_sweep_override() and o.value_type not in ENUMERABLE for o in groups):
            return None  # glob(...) needs Hydra's config loader to list the options
        combinations = itertools.islice(itertools.product(*map(_group_options, groups)), MAX_KEY_CHECK_COMPOSES)
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            cfgs = [compose("train", overrides=list(c), return_hydra_config=True) for c in combinations]
    except HydraException:
        return None  # a malformed override or a config that does not compose: Hydra's own message says why
    keys = [
        (o.key_or_group, str(o.input_line))
        for o in overrides
        if o.type == OverrideType.CHANGE and not o.is_hydra_override() and not _is_group(o, config_dir)
    ]
    search_space = OmegaConf.select(cfgs[0], "hydra.sweeper.params") or {}  # Optuna's (hparams_search=...)
    keys += [(str(k), "hydra.sweeper.params") for k in search_space if not (config_dir / str(k)).is_dir()]
    for key, where in keys:
        if not any(_has_key(cfg, key) for cfg in cfgs):
            return unknown_key_message(key, cfgs, where)
    return None


def objective(metrics: dict[str, float], optimized_metric: str | None) -> float | None:
    """What a sweeper minimises: ``optimized_metric``, or the first ``eval/energy_distance@*`` when null."""
    if optimized_metric is None:
        return next((v for k, v in metrics.items() if k.startswith("eval/energy_distance@")), None)
    if optimized_metric not in metrics:
        close = difflib.get_close_matches(optimized_metric, list(metrics), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UserError(
            f"optimized_metric={optimized_metric} is not among this run's metrics; {hint}"
            f"they are: {', '.join(k for k in metrics if k.startswith(('eval/', 'train/')))}"
        )
    return metrics[optimized_metric]


def is_backend_override(override: str) -> bool:
    key = override.split("=", 1)[0].lstrip("+~")
    return key == "backend" or key.startswith(("backend.", "backend@"))


def submit_remote(cfg: DictConfig, task_overrides: list[str]) -> int:
    """``backend=modal``: hand the run to training/modal_backend.py with the command line's other overrides."""
    try:
        from training.modal_backend import submit_run  # only this backend needs Modal
    except ImportError as e:
        raise UserError(f"backend=modal is unavailable here ({e}); install modal or use backend=local") from e
    overrides = [o for o in task_overrides if not is_backend_override(o)]
    overrides = [f"run_name={cfg.run_name}" if o.startswith("run_name=") else o for o in overrides]  # sweep job name
    return int(submit_run(cfg, overrides))


def run(cfg: DictConfig, task_overrides: list[str], multirun: bool) -> float | None:
    """One run here, or handed to the configured backend; returns the sweeper's objective."""
    if cfg.backend.name == "modal":
        code = submit_remote(cfg, task_overrides)
        if not multirun:
            sys.exit(code)
        if code:
            raise UserError(f"the Modal run exited with status {code}")
        return None
    if needs_relaunch(cfg.trainer.devices):  # trainer.devices=N: the same run under torchrun, N processes
        own = [f"run_name={cfg.run_name}", f"hydra.run.dir={cfg.paths.run_dir}"]  # this job's name and folder
        argv = [sys.argv[0], *(o for o in task_overrides if not o.startswith("run_name=")), *own]
        code = relaunch_with_torchrun(argv, cfg.trainer.devices, cfg.device)
        if code:
            raise UserError(f"the {cfg.trainer.devices}-process run exited with status {code}; see its log above")
        return None
    metrics, _ = train(cfg)
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank returns rank 0's metrics
        print(metrics_table(metrics))
        print(f"run directory: {cfg.paths.run_dir}")
    return objective(metrics, cfg.get("optimized_metric"))


def fail_job(cfg: DictConfig, message: str) -> None:
    """A sweep job failed: keep its error for the summary; the sweep goes on (the process exits 1 at the end)."""
    record_failure(Path(cfg.paths.run_dir), message)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    if multirun and not OmegaConf.is_missing(cfg, "run_name"):
        cfg.run_name = job_run_name(cfg.run_name, hydra_cfg.job.num)
    try:
        return run(cfg, list(hydra_cfg.overrides.task), multirun)
    except UserError as e:
        log.error("%s", e)  # on the console and in the run's launcher.log
        if not multirun:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(e.exit_code)
        fail_job(cfg, str(e))
        if isinstance(e, RunInterrupted):  # Ctrl-C or SIGTERM stops the sweep, not only this job
            sys.exit(e.exit_code)
    except Exception as e:  # in a sweep, a crash of one job must not stop the others
        if not multirun:
            raise
        log.exception("job failed")  # the traceback goes to the job's launcher.log
        fail_job(cfg, f"{type(e).__name__}: {e}")
    return worst_objective(hydra_cfg.sweeper.get("direction"))


def worst_objective(direction: Any) -> float | None:
    """What a failed sweep job returns: the worst value for an optimizing sweeper (Optuna keeps the
    trial and always has a best one to report, even when every trial failed); nothing otherwise."""
    if direction is None or isinstance(direction, (list, ListConfig)):
        return None  # a plain sweep, or several objectives
    return -math.inf if maximizes(direction) else math.inf


if __name__ == "__main__":
    sys.argv[1:] = translate_flags(sys.argv[1:])
    problem = check_run_name(sys.argv[1:]) or check_group_options(sys.argv[1:]) or check_override_keys(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    main()
