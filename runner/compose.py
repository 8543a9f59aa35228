"""Composing a ``RunConfig`` from the YAML configs, for the Python API and for tests.

The command line goes through ``@hydra.main`` (mla_runner.cli); everything else composes the same files
with Hydra's compose API, so a value is validated the same way wherever it comes from.
"""
from __future__ import annotations

import secrets
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mla_runner.config import RunConfig, register_configs
from mla_runner.errors import ConfigError

CONF_DIR = Path(__file__).parent / "conf"  # the package data mla_runner/conf (conf/ of the repository)
GROUPS = ("model", "attention", "metadata", "task")


def to_run_config(cfg: DictConfig) -> RunConfig:
    """The one conversion from Hydra's DictConfig to the typed dataclasses library code receives. A key no schema
    has (``+foo=1`` on the command line) is an error rather than a setting that silently does nothing."""
    unknown = unknown_keys(cfg)
    if unknown:
        raise ConfigError(f"{unknown[0]} is not a setting of this run (mla-runner --help lists them)")
    try:
        run = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e)) from None
    assert isinstance(run, RunConfig)
    return run


def register_resolvers() -> None:
    """``${run_id:}`` in conf/config.yaml: six random hex digits, one value per process (Hydra gives every job of a
    multirun its resolver cache), so that runs started together never share an output directory."""
    if not OmegaConf.has_resolver("run_id"):
        OmegaConf.register_new_resolver("run_id", lambda: secrets.token_hex(3), use_cache=True)


def unknown_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Dotted keys of ``cfg`` that its schema dataclasses do not declare."""
    schema = OmegaConf.get_type(cfg)
    if not (isinstance(schema, type) and is_dataclass(schema)):
        return []
    declared = {f.name for f in fields(schema)}
    out = []
    for key in cfg.keys():
        node = cfg._get_node(key)
        if key not in declared:
            out.append(f"{prefix}{key}")
        elif isinstance(node, DictConfig):
            out.extend(unknown_keys(node, f"{prefix}{key}."))
    return out


def compose_config(overrides: list[str]) -> RunConfig:
    register_configs()
    register_resolvers()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="runner"):
            cfg = compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(explain(e)) from None
    return to_run_config(cfg)


def explain(e: BaseException) -> str:
    """One line for a composition error: the option or field, and what is wrong with it."""
    if isinstance(e, MissingConfigException) and e.missing_cfg_file and "/" in e.missing_cfg_file:
        group, name = e.missing_cfg_file.rsplit("/", 1)
        options = ", ".join(o for o in e.options or [] if not o.startswith("base_"))
        return f"{group}={name} is not an option: choose one of {options}"
    cause = e.__cause__ if isinstance(e.__cause__, OmegaConfBaseException) else e
    key, msg = getattr(cause, "full_key", None), getattr(cause, "msg", None)
    if key and msg:
        return f"{key}: {_one_line(msg.splitlines()[0])}"
    return _one_line(e)


def override(key: str, value: Any) -> str:
    """One Hydra override from a Python keyword argument: a group choice or a field value."""
    if key in GROUPS and isinstance(value, str):
        return f"{key}={value}"
    if value is None:
        return f"{key}=null"
    if isinstance(value, bool):
        return f"{key}={str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"{key}={value}"
    if isinstance(value, (str, Path)):
        escaped = str(value).replace("\\", "\\\\").replace("'", "\\'")
        return f"{key}='{escaped}'"
    raise ConfigError(f"{key}={value!r}: only strings, numbers, booleans and None can be passed")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())
