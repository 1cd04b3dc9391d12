"""Turns a pydantic-settings class into argparse flags, so flags, env vars and defaults agree.

Precedence: flag > `KVMESH_<FLAG>` environment variable > default. Values are validated by
the settings class, so a bad flag and a bad environment variable give the same message.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TypeVar, get_args, get_origin

from pydantic import BaseModel, ValidationError

S = TypeVar("S", bound=BaseModel)


def _is_bool(annotation: Any) -> bool:
    if annotation is bool:
        return True
    return get_origin(annotation) is not None and bool in get_args(annotation) and len(get_args(annotation)) <= 2


def add_settings_arguments(parser: argparse.ArgumentParser, settings_cls: type[BaseModel]) -> None:
    """Adds `--field-name` for every field; defaults stay unset so env vars can apply."""
    for name, field in settings_cls.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = "KVMESH_" + name.upper()
        default = field.default if field.default is not None else "none"
        help_text = f"{field.description or name} [env {env}; default {default}]"
        if _is_bool(field.annotation):
            parser.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
            )
        else:
            parser.add_argument(flag, dest=name, default=argparse.SUPPRESS, metavar=name.upper(), help=help_text)


def settings_from_args(settings_cls: type[S], args: argparse.Namespace) -> S:
    """Builds the settings from parsed flags (which win) and the environment; exits 2 on bad values."""
    given = {name: getattr(args, name) for name in settings_cls.model_fields if hasattr(args, name)}
    try:
        return settings_cls(**given)
    except ValidationError as exc:
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"])
            print(f"kvmesh: invalid --{field.replace('_', '-')}: {err['msg']}", file=sys.stderr)
        raise SystemExit(2) from None
