"""``bidder serve --config FILE``: the serving options in one TOML file an operator can review and version.

The file's keys are ``bidder serve``'s long options without their dashes (``max-batch = 256``,
``notice-url = "https://..."``, ``no-pin = true``), read from the command line's own parser: an option added to
``bidder serve`` is a key of the file with no change here, and a key that is no option is refused, naming the
file and the key's path. Options given on the command line override the file's values (an option given several
times, ``action="append"``, adds to the file's array). Relative paths in the file are read from the file's
directory, so a file and the files it names move together.

Secrets never live in the file: a key that names one (a password, a secret, a token) or a URL that carries a
password is refused; they come from a file the options name (``notice-keys``) or from the environment.
"""
from __future__ import annotations

import argparse
import datetime as dt
import difflib
import json
import math
import sys
from pathlib import Path, PurePath
from urllib.parse import urlsplit

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, before it joined the standard library
    import tomli as tomllib

__all__ = ["ConfigError", "SECRET_WORDS", "option_keys", "read_config", "render_config"]

#: option names holding a secret (unless they name the file that holds it: ``...-file``)
SECRET_WORDS = ("password", "secret", "token", "credential")
#: options that are no serving setting: the file itself
NOT_KEYS = ("config",)


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the key at fault."""


def option_keys(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every option of ``parser`` a config file may set, by key (its longest option string, dashes cut)."""
    keys = {}
    for action in parser._actions:
        if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        key = max(action.option_strings, key=len).lstrip("-")
        if key not in NOT_KEYS:
            keys[key] = action
    return keys


def is_secret(key: str) -> bool:
    return not key.endswith("-file") and any(word in key for word in SECRET_WORDS)


def read_config(path: Path, parser: argparse.ArgumentParser) -> dict[str, object]:
    """The file's settings as ``parser``'s defaults (``dest`` → value, converted as the option converts its
    argument). ConfigError names the file and the key at fault."""
    path = Path(path)
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc}") from None
    keys = option_keys(parser)
    settings: dict[str, object] = {}
    for key, value in data.items():
        where = f"{path}: {key}"
        if is_secret(key):
            raise ConfigError(f"{where}: secrets never live in the config file: give this one in a file or an "
                              f"environment variable (docs/operations.md#secrets)")
        action = keys.get(key)
        if action is None:
            raise ConfigError(_unknown(path, key, value, keys))
        settings[action.dest] = _convert(action, value, where, path.parent)
    return settings


def _unknown(path: Path, key: str, value: object, keys: dict[str, argparse.Action]) -> str:
    dotted = key
    while isinstance(value, dict) and value:  # the path of the first setting inside a table
        inner = next(iter(value))
        dotted, value = f"{dotted}.{inner}", value[inner]
    message = f"{path}: unknown key {dotted!r}: not a bidder serve option"
    if dotted != key:
        message += " (the file has no tables: one flat key per option)"
    close = difflib.get_close_matches(dotted.replace(".", "-").replace("_", "-"), list(keys), n=1)
    if close:
        message += f"; did you mean {close[0]!r}?"
    return message


def _takes_several(action: argparse.Action) -> bool:
    """An option given several values (``nargs='+'``) or several times (``action='append'``): a TOML array."""
    return isinstance(action, argparse._AppendAction) or action.nargs in ("*", "+") or (
        isinstance(action.nargs, int) and action.nargs > 1)


def _convert(action: argparse.Action, value: object, where: str, base: Path) -> object:
    if action.nargs == 0:  # a flag: true sets it, false leaves the option's default
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return action.const if value else action.default
    if _takes_several(action):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected an array of values, got {value!r}")
        return [_convert_one(action, item, f"{where}[{i}]", base) for i, item in enumerate(value)]
    return _convert_one(action, value, where, base)


def _convert_one(action: argparse.Action, value: object, where: str, base: Path) -> object:
    if isinstance(value, (dict, list)):
        raise ConfigError(f"{where}: expected a single value, got {type(value).__name__} {value!r}")
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a value for {max(action.option_strings, key=len)}, got {value}: "
                          f"true/false are for flags")
    if isinstance(value, dt.datetime) and value.tzinfo is None:
        raise ConfigError(f"{where}: a time needs its offset (2026-11-25T14:00:00Z), got {value}")
    text = value.isoformat() if isinstance(value, (dt.datetime, dt.date, dt.time)) else str(value)
    convert = action.type or str
    try:
        converted = convert(text)
    except argparse.ArgumentTypeError as exc:  # the option's own message
        raise ConfigError(f"{where}: {exc}") from None
    except (ValueError, TypeError):  # what argparse says of a plain type
        raise ConfigError(f"{where}: invalid {getattr(convert, '__name__', 'value')} value: {value!r}") from None
    if isinstance(converted, str) and "://" in converted and urlsplit(converted).password is not None:
        raise ConfigError(f"{where}: the URL carries a password: secrets never live in the config file; give "
                          f"it in a file or an environment variable (docs/operations.md#secrets)")
    if action.choices is not None and converted not in action.choices:
        raise ConfigError(f"{where}: expected one of {', '.join(map(str, action.choices))}, got {value!r}")
    if isinstance(converted, PurePath) and not converted.is_absolute():
        converted = type(converted)(base / converted)
    return converted


def render_config(parser: argparse.ArgumentParser, namespace: argparse.Namespace) -> str:
    """The effective configuration as a config file: every option of ``parser`` with its value in
    ``namespace``; options without a value are commented out. Read back, it configures the same server."""
    lines = []
    for key, action in option_keys(parser).items():
        value = getattr(namespace, action.dest, None)
        if action.nargs == 0:
            lines.append(f"{key} = {'true' if value == action.const else 'false'}")
        elif value is None:
            lines.append(f"# {key} =  (not set)")
        elif _takes_several(action):
            lines.append(f"{key} = [{', '.join(_toml_value(item) for item in value)}]")
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    return json.dumps(str(value), ensure_ascii=False)  # a TOML basic string: JSON's escapes are TOML's
