"""The one config layer: YAML files, `--set` overrides, and mappings checked into settings dataclasses.

Every stage reads its YAML with `read_yaml`, names unknown keys with `check_keys` and builds its settings
with `from_mapping`, so a missing file, an unknown key, a wrong type or a value that a dataclass refuses
reaches the user the same way: one `ConfigError` line that names the file (or option) and the key.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from distillery.errors import DistilleryError

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading 1e-3 as a number as YAML 1.2 does (YAML 1.1 wants 1.0e-3)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                              list("-+0123456789."))
# Scalar fields whose YAML value is checked: a wrong type is named here instead of failing deep in a run.
_SCALARS = {"float": (int, float), "int": (int,), "bool": (bool,), "str": (str,)}


class ConfigError(DistilleryError):
    """A config file, section, key or value that cannot be used as it is."""


PROJECT_ROOT = Path(__file__).resolve().parents[1]  # the checkout: configs/, teachers/


def project_path(path: str | Path) -> Path:
    """`path` as given when it exists from here, else the project's own file of that relative name, so that
    `configs/...` and `teachers/...` resolve from any working directory."""
    path = Path(path)
    if path.is_absolute() or path.exists() or not (PROJECT_ROOT / path).exists():
        return path
    return PROJECT_ROOT / path


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file holding a mapping (an empty file is an empty mapping); see `project_path` for where."""
    path = project_path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        values = yaml.load(path.read_text(), Loader=_Loader) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from error
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of names to values, got {type(values).__name__}")
    return values


def apply_overrides(values: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """`key.sub=value` assignments (values read as YAML: 3, 1e-3, [1, 2], true) applied to a copy of `values`."""
    out = _copy(values)
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {override!r}: expected KEY=VALUE (e.g. unic.drop_prob=0.3)")
        try:
            value = yaml.load(text, Loader=_Loader)
        except yaml.YAMLError as error:
            raise ConfigError(f"--set {override!r}: the value is not valid YAML ({error})") from error
        *parents, leaf = key.strip().split(".")
        node = out
        for depth, part in enumerate(parents):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {override!r}: {'.'.join(parents[:depth + 1])} is a value, not a section")
            node = child
        node[leaf] = value
    return out


def _copy(values: dict[str, Any]) -> dict[str, Any]:
    return {k: _copy(v) if isinstance(v, dict) else v for k, v in values.items()}


def check_keys(values: Any, where: str, known: Iterable[str], required: Iterable[str] = (),
               error: type[DistilleryError] = ConfigError) -> dict[str, Any]:
    """`values` as a mapping whose keys are all `known` and include every `required` one; `error` is the
    stage's own subclass where it has one (an experiment definition raises ExperimentError)."""
    known, required = tuple(known), tuple(required)
    if not isinstance(values, dict):
        raise error(f"{where}: expected a mapping, got {type(values).__name__}")
    missing = [k for k in required if k not in values]
    if missing:
        raise error(f"{where}: missing key {missing[0]!r}")
    unknown = sorted(str(k) for k in set(values) - set(known) - set(required))
    if unknown:
        raise error(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted({*known, *required}))}")
    return values


def from_mapping(cls: type[T], values: Any, where: str) -> T:
    """The settings dataclass `cls` from a mapping: unknown keys named, YAML lists made tuples where the
    field is a tuple, and any refusal of the dataclass's own checks reported as one line at `where`."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    check_keys(values, where, fields)
    for key, value in values.items():
        kinds = _SCALARS.get(str(fields[key].type).replace(" | None", ""))
        if kinds and value is not None and (not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool))):
            raise ConfigError(f"{where}: {key} must be {str(fields[key].type)}, got {value!r}")
    converted = {k: tuple(v) if isinstance(v, list) and "tuple" in str(fields[k].type) else v
                 for k, v in values.items()}
    try:
        return cls(**converted)
    except (TypeError, ValueError) as error:  # ConfigError is a ValueError: the dataclass's own checks
        raise ConfigError(f"{where}: {error}") from error
