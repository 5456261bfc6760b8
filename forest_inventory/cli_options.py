"""Command-line flags generated from the run options model (``pipeline.options``).

``run``, ``batch`` and ``serve`` take every run option as a flag (``--n-draws``, ``--ecozone``, ``--cell-m``,
``--fg-threshold``...), plus ``--config FILE`` (TOML; flags override it) and the logging flags. The flags
are built from the options table, so a new ``InventoryConfig`` field is a flag without editing this file.
Every flag defaults to None ("not given") so the config file's value stands unless the flag is given; the
help shows the real default.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import typer

from pipeline.options import Option, check_value, load_config_file, options

_METAVARS = {"int": "N", "float": "X", "path": "PATH", "bands": "R,G,B", "list": "A,B,...",
             "mapping": "K=V,..."}
_KEY_METAVARS = {"hd_local": "A,B,C,RSE", "carbon_fraction": "CF|K=V,...", "crs": "CRS"}


def _help(opt: Option) -> str:
    text = opt.help or "see forest-inventory config --print-defaults"
    if opt.choices and opt.kind != "list":
        text += f" Allowed: {', '.join(opt.choices)}."
    if opt.default is not None and opt.kind not in ("object",):
        default = opt.default
        if isinstance(default, bool):
            default = "on" if default else "off"
        elif isinstance(default, float) and len(repr(default)) > 8:
            default = f"{default:.6g}"
        elif isinstance(default, dict):
            default = ",".join(f"{k}={v}" for k, v in default.items())
        elif isinstance(default, list):
            default = ",".join(map(str, default))
        text += f" [default: {default}]"
    return text


def _parameter(opt: Option) -> inspect.Parameter:
    """The typer parameter of one option (default None = not given)."""
    flags = list(opt.flags)
    if opt.kind == "bool":
        if "/" not in flags[0]:
            flags = [f"{flags[0]}/--no-{flags[0][2:]}"]
        annotation: Any = bool | None
        info = typer.Option(None, *flags, help=_help(opt), show_default=False)
    else:
        annotation = {"int": int | None, "float": float | None}.get(opt.kind, str | None)
        metavar = _KEY_METAVARS.get(opt.key) or _METAVARS.get(opt.kind, "TEXT")
        if opt.choices and opt.kind == "str" and len(opt.choices) <= 4:
            metavar = "|".join(opt.choices)
        elif opt.choices and opt.kind == "str":
            metavar = "NAME"
        info = typer.Option(None, *flags, help=_help(opt), metavar=metavar, show_default=False)
    return inspect.Parameter(opt.key, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation)


def with_run_options(exclude: Iterable[str] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: add a flag for every run option (but ``exclude``) to a command whose function takes
    ``**options``; the command receives them by key (None when not given). Options that only a config file
    can hold (tables of parameter errors) get no flag."""
    skip = set(exclude)

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(func)
        params = [p for p in sig.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
        own = {p.name for p in params}
        extra = [_parameter(o) for o in options().values()
                 if o.key not in skip and o.key not in own and o.kind != "object"]
        func.__signature__ = sig.replace(parameters=params + extra)  # type: ignore[attr-defined]
        func.__annotations__ = {**getattr(func, "__annotations__", {}),
                                **{p.name: p.annotation for p in extra}}
        return func

    return decorate


def given_options(flags: Mapping[str, Any]) -> dict[str, Any]:
    """The run options given as flags, checked (an error names the flag); those not given are left out."""
    table = options()
    out = {}
    for key, value in flags.items():
        if value is None or key not in table:
            continue
        opt = table[key]
        out[key] = check_value(opt, value, opt.flags[0].split("/")[0])
    return out


def merged_options(config: Path | None, flags: Mapping[str, Any]) -> dict[str, Any]:
    """Options of the ``--config`` file (if any) overridden by the flags given; flat and checked."""
    values = load_config_file(config) if config is not None else {}
    values.update(given_options(flags))
    return values


class PlainArgumentsCommand(typer.core.TyperCommand):
    """A command whose arguments show as their metavar (``ORTHO``, ``[IMAGE]``) in the usage line and in the
    help, without typer's ``{ortho}`` braces and ``<str>`` type tag."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if isinstance(param, typer.core.TyperArgument):
                name = param.metavar or param.name.upper()
                param.display_type_rich = lambda ctx: None  # type: ignore[method-assign]
                param._usage_display_name = lambda name=name: name  # type: ignore[method-assign]
