"""Loading a config: ``yaml.safe_load`` → OmegaConf (``${...}`` interpolation, ``a.b=value`` overrides) →
pydantic validation → the cross-section and ``_component_`` checks; every problem becomes one line of a
``ConfigError`` naming the file, the dotted path and what was expected (with a "did you mean" for a typo)."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ValidationError

from docev.config.components import COMPONENT_SECTIONS, component_errors, tokenizer_errors
from docev.config.schema import DocEVConfig
from docev.config.sections import ConfigError


class _SafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``5e-4`` as a float (YAML 1.1 wants ``5.0e-4``)."""


_SafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+)$"),
    list("-+0123456789."),
)


def safe_load(text: str) -> Any:
    return yaml.load(text, Loader=_SafeLoader)  # noqa: S506 - a SafeLoader subclass


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``a.b.c=value`` → (path, yaml-parsed value). Bad syntax is a ConfigError."""
    out = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError([f"override {item!r}: expected key.sub=value (e.g. optimizer.lr=2e-5)"])
        try:
            value = safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError([f"override {item!r}: value is not valid YAML ({exc.problem})"]) from exc
        out.append((key, value))
    return out


def load_raw(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """YAML (safe) + overrides + ``${...}`` interpolation, before schema validation."""
    path = Path(path)
    try:
        data = safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read ({exc.strerror})"]) from exc
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: invalid YAML: {exc}"]) from exc
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: expected a mapping at the top level, got {type(data).__name__}"])
    return resolve(data, overrides or [], origin=str(path))


def resolve(data: dict[str, Any], overrides: list[str], origin: str = "<config>") -> dict[str, Any]:
    """Apply overrides and resolve interpolations on an already-parsed mapping."""
    cfg = OmegaConf.create(data)
    for key, value in parse_overrides(overrides):
        try:
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)
        except OmegaConfBaseException as exc:
            raise ConfigError([f"{origin}: override {key}: {_omega_msg(exc)}"]) from exc
    try:
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        where = getattr(exc, "full_key", "") or "?"
        raise ConfigError([f"{origin}: {where}: interpolation failed: {_omega_msg(exc)}"]) from exc


def _omega_msg(exc: Exception) -> str:
    return str(exc).splitlines()[0]


def load_config(path: str | Path, overrides: list[str] | None = None) -> DocEVConfig:
    """Load, override, interpolate, validate. Raises ConfigError listing every problem."""
    return validate_dict(load_raw(path, overrides), origin=str(path))


def validate_dict(data: dict[str, Any], origin: str = "<config>") -> DocEVConfig:
    try:
        cfg = DocEVConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError([_format_error(err, origin) for err in exc.errors()]) from None
    errors = [f"{origin}: {path}: {msg}" for path, msg in cfg.cross_checks()]
    for name in COMPONENT_SECTIONS:
        errors += [f"{origin}: {name}.{msg}" for msg in component_errors(getattr(cfg, name))]
    errors += [f"{origin}: tokenizer.{msg}" for msg in tokenizer_errors(cfg.tokenizer)]
    if errors:
        raise ConfigError(errors)
    return cfg


def _format_error(err: dict[str, Any], origin: str) -> str:
    loc = [str(p) for p in err["loc"]]
    path = ".".join(loc) or "<top>"
    kind = err["type"]
    if kind == "extra_forbidden":
        msg = "unknown key" + _suggest(loc)
    elif kind == "missing":
        msg = "required key is missing"
    else:
        msg = err["msg"].removeprefix("Value error, ")
        if "input" in err and kind not in ("value_error",) and not isinstance(err["input"], dict | list):
            msg += f" (got {err['input']!r})"
    return f"{origin}: {path}: {msg}"


def _suggest(loc: list[str]) -> str:
    """'did you mean' for an unknown key, from the fields of the model at that location."""
    model: Any = DocEVConfig
    for part in loc[:-1]:
        if part.isdigit():
            continue
        field = _field(model, part)
        if field is None:
            return ""
        model = _model_of(field.annotation)
        if model is None:
            return ""
    names = [f.alias or n for n, f in model.model_fields.items()]
    close = difflib.get_close_matches(loc[-1], names, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else f" (expected one of: {', '.join(sorted(names))})"


def _field(model: type[BaseModel], name: str):
    for fname, f in model.model_fields.items():
        if name in (fname, f.alias):
            return f
    return None


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found is not None:
            return found
    return None
