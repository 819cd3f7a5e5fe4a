"""``python launcher.py -m run_name=NAME key=a,b hydra/launcher=modal``: every job of the sweep in
its own Modal container, all at once (spawn all, then gather), with ``backend=modal``'s settings.

Hydra imports this module on every launch to discover plugins, so Modal and the training code are
imported only when a sweep is launched. No ``from __future__ import annotations``: Hydra loads the
module outside ``sys.modules``, where dataclasses cannot resolve string annotations.
"""

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


@dataclass
class ModalLauncherConf:
    _target_: str = "hydra_plugins.modal_launcher.modal_launcher.ModalLauncher"
    # a metric name (e.g. eval/energy_distance@nfe4): each job returns that value, as an optimizing
    # sweeper (hparams_search) needs; null: each job returns its metrics dict
    return_metric: str | None = None


ConfigStore.instance().store(group="hydra/launcher", name="modal", node=ModalLauncherConf, provider="modal_launcher")


@dataclass(frozen=True)
class Job:
    """One sweep job as a container runs it: its overrides (run_name made unique, as the launcher
    does for local sweeps) and its composed config."""

    num: int
    run_name: str
    overrides: list[str]
    cfg: DictConfig
    spec: Any  # training.modal_backend.ModalSpec


class ModalLauncher(Launcher):
    def __init__(self, return_metric: str | None = None) -> None:
        self.return_metric = return_metric
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context  # the task function runs in the containers, never here

    def job(self, num: int, overrides: Sequence[str]) -> Job:
        from training.modal_backend import ModalSpec, container_overrides, with_modal_backend
        from training.outputs import require_run_name
        from training.sweep_summary import job_run_name

        assert self.config is not None and self.hydra_context is not None
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, with_modal_backend(overrides))
        with open_dict(cfg):
            cfg.hydra.job.num = num
        run_name = job_run_name(require_run_name(cfg), num)  # as launcher.py names a local sweep's jobs
        spec = ModalSpec.from_config(cfg.backend)
        kept = [o for o in overrides if not o.startswith("run_name=")]
        return Job(num, run_name, container_overrides([*kept, f"run_name={run_name}"], spec), cfg, spec)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from training import modal_backend
        from training.errors import UserError

        try:  # before anything is uploaded: a bad setting is one line, as launcher.py reports it
            modal_backend.require_modal_token()
            jobs = [self.job(initial_job_idx + i, o) for i, o in enumerate(job_overrides)]
            specs = {job.spec for job in jobs}
            if len(specs) != 1:
                raise modal_backend.ModalSetupError(
                    "the jobs of a Modal sweep share one backend setting; sweep backend.* in separate launches"
                )
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        built = modal_backend.build_app(specs.pop())
        for job in jobs:
            log.info("#%d : %s", job.num, " ".join(filter_overrides(job.overrides)))
        with modal_backend.app_session(built.app):
            calls = [built.train.spawn(job.overrides) for job in jobs]
            return [self.job_return(job, call) for job, call in zip(jobs, calls, strict=True)]

    def job_return(self, job: Job, call: Any) -> JobReturn:
        """Wait for ``call`` (a ``modal.FunctionCall``) and report it as Hydra's result of ``job``."""
        task_cfg = OmegaConf.masked_copy(job.cfg, [str(k) for k in job.cfg if k != "hydra"])
        ret = JobReturn(overrides=job.overrides, cfg=task_cfg, hydra_cfg=job.cfg, task_name=job.cfg.hydra.job.name)
        try:
            result = call.get()
            metrics = result.unwrap()
            ret.return_value = metrics if self.return_metric is None else metrics[self.return_metric]
            ret.working_dir = result.run_dir
            ret.status = JobStatus.COMPLETED
            log.info("#%d %s: done, %s", job.num, job.run_name, result.run_dir)
        except Exception as e:  # Hydra reports a failed job through its JobReturn, raised by the sweeper
            ret.return_value = e
            ret.status = JobStatus.FAILED
            log.error("#%d %s failed: %s", job.num, job.run_name, e)
        return ret
