"""``python -m runner``: the Hydra entry point."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from runner.compose import CONF_DIR, compose_config, to_run_config
from runner.config import register_configs
from runner.errors import ConfigError, UserError

log = logging.getLogger("runner")

register_configs()


def _prevalidate(argv: list[str]) -> None:
    """Compose a single run's overrides once before Hydra does, so a bad value costs one line, not a
    multi-line report. Multiruns and Hydra's own flags are left to Hydra."""
    if any(arg.startswith("-") for arg in argv):
        return
    try:
        compose_config(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    (output_dir / "resolved_config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    try:
        run = to_run_config(cfg)
        from runner.tasks import TASKS

        TASKS[run.task.name](run, output_dir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def run() -> None:
    _prevalidate(sys.argv[1:])
    main()
