"""Command-line flags generated from a training config dataclass (edje_search/training/configs.py).

Every field that carries a ``help`` becomes ``--field-name`` with the field's default, so the
flag, its default and the library's default are one definition. ``--config FILE`` starts from
a saved config (a run's ``train_config.json``); flags typed on the command line override it.
"""
from __future__ import annotations

import dataclasses
import json

import click
from click.core import ParameterSource


def _click_type(spec):
    if not isinstance(spec, tuple):
        return spec
    kind, *args = spec
    if kind == "choice":
        return click.Choice(args[0])
    if kind == "float_range":
        return click.FloatRange(args[0], args[1], max_open=True)
    if kind == "int_range":
        return click.IntRange(min=args[0], max=args[1])
    raise ValueError(f"unknown flag type {kind!r}")


def flag_fields(config_cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(config_cls) if "help" in f.metadata]


def config_flags(config_cls):
    """Decorator: one click option per flag field of ``config_cls``, plus ``--config FILE``."""
    def decorate(command):
        for field in reversed(flag_fields(config_cls)):
            extra = dict(field.metadata.get("click", {}))
            settings = {"default": field.default, "show_default": field.default is not None,
                        "help": field.metadata["help"]}
            if "type" in extra:
                settings["type"] = _click_type(extra.pop("type"))
            command = click.option("--" + field.name.replace("_", "-"), field.name, **settings, **extra)(command)
        return click.option("--config", "config_file", default=None, type=click.Path(exists=True, dir_okay=False),
                            help=f"JSON of {config_cls.__name__} fields (a run's train_config.json) to start "
                                 f"from; flags given on the command line override it.")(command)
    return decorate


def config_from_flags(config_cls, params: dict, config_file: str | None, **fixed):
    """The config the command line asks for: ``config_file`` (if any), then the flags typed, then
    ``fixed`` (values the command derives itself)."""
    ctx = click.get_current_context()
    values: dict = {}
    if config_file:
        try:
            values = json.loads(open(config_file, encoding="utf-8").read())
        except (OSError, ValueError) as e:
            raise click.BadParameter(f"{config_file}: {e}", param_hint="--config") from None
        known = {f.name for f in dataclasses.fields(config_cls)}
        unknown = sorted(set(values) - known) if isinstance(values, dict) else ["(not a JSON object)"]
        if unknown:
            raise click.BadParameter(f"{config_file}: unknown fields {', '.join(unknown)}", param_hint="--config")
    for field in flag_fields(config_cls):
        typed = ctx.get_parameter_source(field.name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
        if typed or not config_file:
            values[field.name] = params[field.name]
    values.update(fixed)
    return config_cls(**values)
