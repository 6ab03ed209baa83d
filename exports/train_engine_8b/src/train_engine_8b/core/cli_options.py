"""`pretrain`'s options, derived from the typed config: one option per field of EngineConfig's sections
(`--field-name`, the field's default and description), so the command line cannot drift from config.py.
A bool field is `--name/--no-name`; a Literal is taken as text and validated by the config (one message
form for the command line and a --config file). `given(ctx)` names the options typed on the command line:
they override a --config file, field by field.
"""

from __future__ import annotations

import functools
import inspect
import types
from typing import Any, Callable, Literal, Optional, Union, get_args, get_origin, get_type_hints

import typer
from pydantic.fields import FieldInfo

from .config import CheckpointConfig, DataConfig, OptimConfig, RuntimeConfig, TrainConfig

SECTIONS = {"train": TrainConfig, "optim": OptimConfig, "data": DataConfig, "checkpoint": CheckpointConfig,
            "runtime": RuntimeConfig}
CONFIG_ONLY = {"betas", "eps"}  # a --config file only: the training contract passes neither


@functools.cache
def fields() -> dict[str, tuple[str, FieldInfo]]:
    """Option name (= field name) -> (section, field), in config.py's order."""
    out: dict[str, tuple[str, FieldInfo]] = {}
    for section, model in SECTIONS.items():
        for name, info in model.model_fields.items():
            if name in CONFIG_ONLY:
                continue
            if name in out:
                raise TypeError(f"config field {name} is in two sections ({out[name][0]}, {section}): options need one name")
            out[name] = (section, info)
    return out


def _parameter(name: str, info: FieldInfo) -> inspect.Parameter:
    annotation, optional = info.annotation, False
    args = get_args(annotation)
    if get_origin(annotation) in (Union, types.UnionType) and type(None) in args:
        (annotation,), optional = [a for a in args if a is not type(None)], True
    if get_origin(annotation) is Literal:
        annotation = str
    flag = "--" + name.replace("_", "-")
    decls = f"{flag}/--no-{flag[2:]}" if annotation is bool else flag
    option = typer.Option(info.default, decls, help=info.description)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option,
                             annotation=Optional[annotation] if optional else annotation)


def with_config_options(fn: Callable) -> Callable:
    """`fn(own options..., **options)` as a typer command with every config field as an option too."""
    hints = get_type_hints(fn)
    own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in inspect.signature(fn).parameters.values()
           if p.kind is not inspect.Parameter.VAR_KEYWORD]
    derived = [_parameter(name, info) for name, (_, info) in fields().items()]
    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + derived
    fn.__signature__ = inspect.Signature(params)
    fn.__annotations__ = {p.name: p.annotation for p in params}
    return fn


def given(ctx: typer.Context) -> set[str]:
    """The parameters of the running command that were typed on its command line."""
    return {name for name in ctx.params if getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"}


def sections(options: dict[str, Any], base: dict[str, dict], explicit: set[str]) -> dict[str, dict]:
    """Section values: `base` (a --config file's), with the options in `explicit` laid over it."""
    out = {s: dict(base.get(s, {})) for s in SECTIONS}
    for name, (section, _) in fields().items():
        if name in explicit:
            out[section][name] = options[name]
    return out
