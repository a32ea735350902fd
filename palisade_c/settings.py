"""Option values from a TOML config file and ``PALISADE_*`` environment variables.

Precedence, highest first: command-line flags, then environment variables, then the config
file, then the built-in defaults. Every long option of every subcommand can come from either
source:

* environment: ``PALISADE_<OPTION>``, the long option's name upper-cased with dashes as
  underscores (``--log-level`` is ``PALISADE_LOG_LEVEL``); a repeatable option takes a
  comma-separated list; a switch takes ``1/true/yes/on`` or ``0/false/no/off``. The URL
  argument of ``serve``/``connect`` is ``PALISADE_URL``.
* config file (``--config FILE`` or ``PALISADE_CONFIG``): top-level keys apply to every
  command, a ``[serve]``/``[connect]``/``[gateway]``/... table to that command only (it wins
  over the top level). Keys are long option names, with dashes or underscores; a repeatable
  option takes a TOML array.

The values are applied as argparse defaults before the real parse, so a flag on the command
line always wins and the usual type checks and error messages apply to every source. A
required option that a source provides is no longer required on the command line.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Mapping, Sequence
from typing import Any

from palisade_c.errors import ConfigError

__all__ = ["ENV_PREFIX", "apply_sources", "env_name", "finish"]

ENV_PREFIX = "PALISADE_"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})
#: Options that only make sense on the command line.
_NOT_CONFIGURABLE = frozenset({"help", "version", "config", "command"})


class _FromSources(list[Any]):
    """A repeatable option's default that came from a file or the environment: argparse
    appends command-line values to a list default, and flags must replace it instead."""

    base_len = 0


def env_name(dest: str) -> str:
    return ENV_PREFIX + dest.upper()


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _configurable(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions
            if a.dest not in _NOT_CONFIGURABLE and a.dest != argparse.SUPPRESS
            # Hidden options are internal (a worker's inherited socket): never from a file
            # or the environment, where they would turn any serve into a worker.
            and a.help != argparse.SUPPRESS
            and not isinstance(a, (argparse._HelpAction, argparse._VersionAction,
                                   argparse._SubParsersAction))]


def _read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def _normalise(table: Mapping[str, Any]) -> dict[str, Any]:
    return {k.replace("-", "_"): v for k, v in table.items() if not isinstance(v, dict)}


def _is_switch(action: argparse.Action) -> bool:
    return action.nargs == 0


def _is_list(action: argparse.Action) -> bool:
    return isinstance(action, argparse._AppendAction)


def _convert(parser: argparse.ArgumentParser, action: argparse.Action, value: Any,
             source: str) -> Any:
    """``value`` (a string from the environment, or a TOML value) as argparse would store it."""
    name = "/".join(action.option_strings) or action.dest
    if _is_switch(action):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ConfigError(f"{source}: {name} takes true or false, not {value!r}")
    if _is_list(action):
        items = value if isinstance(value, list) else [
            part.strip() for part in str(value).split(",") if part.strip()]
        return [_convert_one(action, item, name, source) for item in items]
    if isinstance(value, list):
        raise ConfigError(f"{source}: {name} takes one value, not a list")
    return _convert_one(action, value, name, source)


def _convert_one(action: argparse.Action, value: Any, name: str, source: str) -> Any:
    text = str(value)
    converter = action.type
    try:
        result = converter(text) if callable(converter) else text
    except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
        raise ConfigError(f"{source}: {name}: {exc}") from None
    if action.choices is not None and result not in action.choices:
        raise ConfigError(f"{source}: {name}: {value!r} is not one of "
                          f"{', '.join(map(str, action.choices))}")
    return result


def _command_of(parser: argparse.ArgumentParser, argv: Sequence[str]) -> str | None:
    """The subcommand: the first argument that is not an option (nor --config's value)."""
    commands = _subparsers(parser)
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--config", "--log-level"):
            skip = True
        elif not arg.startswith("-"):
            return arg if arg in commands else None
    return None


def apply_sources(parser: argparse.ArgumentParser, argv: Sequence[str],
                  environ: Mapping[str, str] | None = None) -> None:
    """Install config-file and environment values as ``parser``'s defaults (see the module
    docstring). ``--config FILE`` is looked for in ``argv``; raises ConfigError for a bad
    file or value."""
    env = os.environ if environ is None else environ
    config_path = env.get(ENV_PREFIX + "CONFIG")
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            config_path = argv[i + 1]
        elif arg.startswith("--config="):
            config_path = arg.partition("=")[2]
    command = _command_of(parser, argv)
    file_values: dict[str, Any] = {}
    if config_path:
        data = _read_file(config_path)
        file_values = _normalise(data)
        section = data.get(command) if command else None
        if isinstance(section, dict):
            file_values.update(_normalise(section))
    parsers = [parser]
    if command:
        parsers.append(_subparsers(parser)[command])
    for p in parsers:
        for action in _configurable(p):
            if env_name(action.dest) in env:
                value = _convert(p, action, env[env_name(action.dest)],
                                 f"environment variable {env_name(action.dest)}")
            elif action.dest in file_values:
                value = _convert(p, action, file_values[action.dest],
                                 f"config file {config_path}")
            else:
                continue
            if _is_list(action):
                default = _FromSources(value)
                default.base_len = len(value)
                value = default
            action.default = value
            action.required = False
            if not action.option_strings and action.nargs is None:
                action.nargs = "?"  # a positional argument given by a source


def finish(args: argparse.Namespace) -> None:
    """After parsing: a repeatable option given on the command line replaces, rather than
    extends, what the file or environment said (flags take precedence)."""
    for name, value in vars(args).items():
        if isinstance(value, _FromSources):
            given = list(value[value.base_len:])
            setattr(args, name, given if given else list(value))
