"""Configuration: YAML files and ``key=value`` overrides, validated into typed objects.

Structured configs are dataclasses checked by OmegaConf: an unknown key or a value of the wrong type is a
``ValueError`` that names the key. Sections whose keys depend on a class (a simulator's parameters, an observation
model's) are checked against that class's constructor by :func:`build`.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = ["load_yaml", "structured", "parse_overrides", "build", "to_yaml"]

T = TypeVar("T")


def load_yaml(path: str | Path) -> dict:
    """Read a YAML file into a plain ``dict``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no configuration file at {path}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # yaml errors
        raise ValueError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(cfg, DictConfig):
        raise ValueError(f"{path} must hold a mapping of keys to values at its top level")
    return OmegaConf.to_container(cfg, resolve=True)


def _error(e: OmegaConfBaseException, where: str) -> ValueError:
    key = getattr(e, "full_key", None)
    msg = str(e).splitlines()[0]
    return ValueError(f"invalid {where}: key '{key}': {msg}" if key else f"invalid {where}: {msg}")


def structured(cls: type[T], *sources: Mapping | DictConfig, where: str = "configuration") -> T:
    """Merge ``sources`` (later ones win) over the defaults of dataclass ``cls`` and validate.

    Raises:
        ValueError: an unknown key, a missing required key or a value of the wrong type, with the key named.
    """
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(cls), *sources)
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise _error(e, where) from None


def parse_overrides(items: Sequence[str]) -> DictConfig:
    """``["a.b=1", "c=x"]`` into a config (values parsed as YAML: numbers, booleans, lists)."""
    for item in items:
        if "=" not in item or item.startswith("="):
            raise ValueError(f"override {item!r} must look like key=value (e.g. simulator.K=64)")
    try:
        return OmegaConf.from_dotlist(list(items))
    except OmegaConfBaseException as e:
        raise _error(e, "override") from None


def build(registry: Mapping[str, type], section: Mapping[str, Any], where: str, **extra: Any) -> Any:
    """Instantiate ``registry[section["name"]]`` with the other keys of ``section`` as arguments.

    Keys are checked against the constructor's signature; numbers are converted to the type of the default
    (``8`` for a float parameter is fine, ``8.5`` for an integer one is not).
    """
    section = dict(section)
    name = section.pop("name", None)
    if name not in registry:
        raise ValueError(f"{where}.name must be one of {sorted(registry)}, got {name!r}")
    cls = registry[name]
    params = inspect.signature(cls).parameters
    kwargs = {}
    for key, value in section.items():
        if key not in params or key in extra:
            allowed = sorted(k for k in params if k not in extra and params[k].kind is params[k].POSITIONAL_OR_KEYWORD)
            raise ValueError(f"unknown key '{where}.{key}' for {cls.__name__}; allowed: {allowed}")
        kwargs[key] = _coerce(value, params[key].default, f"{where}.{key}")
    return cls(**kwargs, **extra)


def _coerce(value: Any, default: Any, key: str) -> Any:
    if isinstance(default, bool) or default is None or default is inspect.Parameter.empty:
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ValueError(f"'{key}' must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"'{key}' must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"'{key}' must be a number, got {value!r}")
        return float(value)
    if isinstance(default, str) and not isinstance(value, str):
        raise ValueError(f"'{key}' must be a string, got {value!r}")
    return value


def to_yaml(obj: Any) -> str:
    """A dataclass or mapping as YAML text."""
    return OmegaConf.to_yaml(OmegaConf.structured(obj) if not isinstance(obj, Mapping) else OmegaConf.create(obj))
