"""Every command-line flag can also come from an environment variable: ``--max-num-seqs`` from
``NANOSERVE_MAX_NUM_SEQS``. A flag on the command line wins over the variable, which wins over the
default; ``--help`` shows the defaults and the variable names. Read once, in ``main()``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping

PREFIX = "NANOSERVE_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_name(dest: str) -> str:
    return PREFIX + dest.upper()


def apply_env_defaults(
    parser: argparse.ArgumentParser, environ: Mapping[str, str] | None = None
) -> argparse.ArgumentParser:
    """Take each flag's default from its ``NANOSERVE_*`` variable when set; raise on a bad value."""
    environ = os.environ if environ is None else environ
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "version"):
            continue
        name = env_name(action.dest)
        if action.help is not argparse.SUPPRESS:
            action.help = f"{action.help or ''} [env {name}]".strip()
        if name not in environ:
            continue
        raw = environ[name]
        action.default = _parse(action, name, raw)
        action.required = False
    return parser


def _parse(action: argparse.Action, name: str, raw: str) -> object:
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        lowered = raw.strip().lower()
        if lowered not in _TRUE | _FALSE:
            raise SystemExit(f"{name}={raw!r}: expected one of 1/0, true/false, yes/no, on/off")
        value = lowered in _TRUE
        return value if isinstance(action, argparse._StoreTrueAction) else not value
    convert: Callable[[str], object] = action.type if callable(action.type) else str
    try:
        return convert(raw)
    except (TypeError, ValueError) as err:
        raise SystemExit(f"{name}={raw!r}: {err}") from None
