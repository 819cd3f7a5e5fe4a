"""DenoisingZoo entry point: compose the Hydra config and train (or evaluate) one run.

python launcher.py run_name=NAME [group=option ...] [key=value ...]
python launcher.py -m run_name=sweep seed=0,1,2      # one job per combination
python launcher.py --help                             # groups, options and defaults
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from training.errors import UserError
from training.train import metrics_table, train

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
log = logging.getLogger("launcher")


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


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN and not OmegaConf.is_missing(cfg, "run_name"):
        cfg.run_name = f"{cfg.run_name}_{hydra_cfg.job.num}"  # sweep jobs must not share a checkpoint folder
    try:
        metrics, _ = train(cfg)
    except UserError as e:
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(metrics_table(metrics))
    print(f"run directory: {cfg.paths.run_dir}")
    return next((v for k, v in metrics.items() if k.startswith("eval/energy_distance@")), None)


if __name__ == "__main__":
    problem = check_group_options(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    main()
