"""Reading and writing configs: YAML files, ``--set a.b=c`` overrides, and the reference table."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .schema import Config
from .sections import ConfigError


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.steps=100")
    key, raw = item.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw else ""


def set_dotted_key(data: dict, key: str, value: Any, where: str, create: bool = False) -> None:
    """Set dotted ``key`` (``a.b.c``) in a nested config dict; ``where`` names the setting in errors.

    ``create`` makes missing sections (``--set``: the schema then names the unknown key); without it
    a missing section is an error here (a swept or seed key must name an existing setting).
    """
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        if part not in node and not create:
            raise ConfigError(
                f"{where}: {'.'.join(parts[: i + 1])!r} is not a config section; check the spelling "
                f"(`stablerep-ray config-reference` lists all keys)"
            )
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: {part!r} is not a section")
    node[parts[-1]] = value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=c`` overrides (values parsed as YAML) to a nested dict."""
    for item in overrides or []:
        key, value = _parse_override(item)
        set_dotted_key(data, key, value, f"--set {item!r}", create=True)
    return data


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"{key}: unknown key; check the spelling (`stablerep-ray config-reference` lists all keys)"
    if not key:  # model-level validator: the message already starts with the key
        return msg
    got = first.get("input")
    return f"{key}: {msg} (got {got!r})" if not isinstance(got, dict) else f"{key}: {msg}"


def from_dict(data: dict) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


BASE_KEY = "base"


def merge(base: dict, override: dict) -> dict:
    """``override`` laid over ``base``: mappings merge key by key, lists and scalars replace."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_mapping(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def read_config_file(path: str | os.PathLike, _chain: tuple[Path, ...] = ()) -> dict:
    """A YAML config with its ``base:`` files (paths relative to it, one or a list, later ones
    winning) merged underneath it, recursively; a file that extends itself is refused."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    data = _read_mapping(path)
    bases = data.pop(BASE_KEY, None)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"{path}: {BASE_KEY}: expected a config file path or a list of them, got {bases!r}")
    chain = (*_chain, path)
    merged: dict = {}
    for base in bases:
        base_path = path.parent / base
        if any(base_path.resolve() == p.resolve() for p in chain):
            cycle = " -> ".join(str(p) for p in (*chain, base_path))
            raise ConfigError(
                f"{path}: {BASE_KEY}: {base!r} closes a cycle ({cycle}); remove one of these base entries"
            )
        if not base_path.is_file():
            raise ConfigError(
                f"{path}: {BASE_KEY}: {base!r} not found (looked for {base_path}); base paths are relative "
                f"to the file that names them"
            )
        merged = merge(merged, read_config_file(base_path, chain))
    return merge(merged, data)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (with its ``base:`` files), apply ``--set`` overrides and validate; relative
    paths inside it are kept as given."""
    data = read_config_file(path) if path else {}
    return from_dict(apply_overrides(data, overrides or []))


def dump_config(config: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


def config_diff(old: dict, new: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` of every setting two config dicts disagree on; a key
    one side lacks reads as None."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append((f"{prefix}{key}", a, b))
    return out


def reference_markdown() -> str:
    """The configuration reference: every key, its default and meaning, from the schema itself."""
    lines = ["| key | default | meaning |", "| --- | --- | --- |",
             f"| `{BASE_KEY}` | `None` | Config files only: a config file (or list of them) this one extends, relative "
             f"to it; read first, then this file's settings laid over (mappings merge, lists and scalars replace). |"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{prefix}{name}.")
                continue
            default = field.get_default(call_default_factory=True)
            lines.append(f"| `{prefix}{name}` | `{default!r}` | {field.description or ''} |")

    walk(Config, "")
    return "\n".join(lines)
