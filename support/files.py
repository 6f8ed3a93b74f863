"""Reading the TOML files an operator writes (run, coordinator and agent configs) the same way on
both sides: bounded in size, UTF-8, and every problem named by file and field."""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import ValidationError

MAX_CONFIG_BYTES = 1 << 20  # a config is a few KB; anything near this is a mistake


class ConfigError(ValueError):
    """A config value outside its allowed range; the message names each field."""


def parse_toml(text: str | bytes, source: str) -> dict:
    """TOML text (at most MAX_CONFIG_BYTES, UTF-8) as a dict, or a ConfigError."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: {len(text)} bytes is too large for a config (at most {MAX_CONFIG_BYTES})")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(f"{source}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{source}: not valid TOML ({err})") from None
    except (RecursionError, ValueError) as err:  # deep nesting, integers past Python's digit limit
        raise ConfigError(f"{source}: not a usable TOML document ({type(err).__name__}: {str(err)[:200]})") from None


def read_toml_file(path: Path) -> dict:
    path = Path(path)
    try:
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {size} bytes is too large for a config (at most {MAX_CONFIG_BYTES})")
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"config file {str(path)[:200]}: {err.strerror or err}") from None
    return parse_toml(raw, str(path))


def describe_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem: `field.path: what is wrong (got value)`."""
    lines = [f"invalid {source}:"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        shown = e.get("input")
        got = f" (got {shown!r:.80})" if e["type"] != "missing" and not isinstance(shown, dict) else ""
        msg = "unknown key; remove it or check its spelling" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {field}: {msg}{got}")
    return "\n".join(lines)


def resolve_path(path: str | Path, base: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base / p).resolve()
