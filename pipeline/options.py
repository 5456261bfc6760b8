"""The run options model: one table of every inventory option, read by the CLI flags, the TOML config file,
``batch``, ``serve``, the Prefect flows and the Python API.

The table is generated from the dataclasses it describes, so a field added to ``InventoryConfig`` (or a
user-facing ``CarbonConfig`` field, or a crown post-processing threshold) is an option everywhere without a
second list: ``InventoryConfig`` fields are top-level keys, ``CarbonConfig`` fields live in ``[carbon]``, the
thresholds of ``pipeline.crowns.extract_crowns`` in ``[postprocess]``. Keys are unique across the sections,
so a flat mapping (``n_draws=10000``) works as well as a nested one (``{"carbon": {"n_draws": 10000}}``).

Every value is checked here, before any work: an unknown key or a bad value raises ``InputError`` with one
line naming the key, where it came from and the allowed values.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import InputError

SECTIONS = ("", "postprocess", "carbon")  # "" = top level (InventoryConfig fields)

#: InventoryConfig fields that are not single options: filled from the [postprocess] and [carbon] sections
_SECTION_FIELDS = {"postprocess", "carbon"}
#: CarbonConfig fields the run sets itself (seed/threads from the top level; the rest from the run's data)
_CARBON_INTERNAL = {"seed", "threads", "area_ha", "species_probs", "species_classes", "detection_calibration"}

#: help texts (units in the text); a field without one says where it is documented
HELP: dict[str, str] = {
    "ortho": "Orthomosaic (GeoTIFF, COG or VRT; RGB, RGBA or multiband).",
    "out_dir": "Output folder (created; rerunning resumes unfinished work).",
    "chm": "Canopy height model (any CRS/resolution), m.",
    "dtm": "Digital terrain model, with --dsm: height = DSM - DTM.",
    "dsm": "Digital surface model; alone, the ground comes from its gaps between crowns (interpolated).",
    "crown_model": "Crown ONNX model (unset: models/zoo/crowns.onnx).",
    "species_model": "Species ONNX model (unset: models/zoo/species.onnx when present).",
    "use_species_model": "Classify species; off (--no-species): every tree is 'unknown'.",
    "bands": "1-based red,green,blue band numbers, e.g. 1,2,3 (unset: the RGB-tagged bands, or 1,2,3).",
    "crs": "CRS for an input without one, e.g. EPSG:32617.",
    "threads": "ONNX Runtime and Monte Carlo threads, 1 to the machine's cores (unset: all cores).",
    "seed": "Seed of the carbon Monte Carlo.",
    "plots": "Plot polygons (GPKG/GeoJSON) for per-plot totals.",
    "batch_size": "Tiles per ONNX call (more: more memory, ~120 MB per 512 px tile; no speed).",
    "tiles_per_group": "Tiles per persisted group (the unit of resume and of flow tasks).",
    "cell_m": "Edge of the aggregation grid cells, m.",
    "tta": "Average the crown model over 4 flipped/rotated views of each tile (4x segmentation time).",
    "overwrite": "Replace the inventory of another orthomosaic in --out (refused otherwise; the same "
                 "orthomosaic resumes).",
    # [postprocess]
    "min_area_m2": "Smallest crown kept, m² (unset: the crown model's calibrated value).",
    "fg_threshold": "Crown probability above which a pixel is crown, 0-1 (unset: the model's value).",
    "interior_threshold": "Interior probability of watershed seeds, 0-1 (unset: the model's value).",
    "seed_min_distance_m": "Least distance between two crowns' seeds, m (unset: the model's value).",
    "min_score": "Least mean crown probability of a kept crown, 0-1 (unset: the model's value).",
    "chm_min_height_m": "With a CHM: least seed height, m (unset: the model's value).",
    "chm_smooth_m": "With a CHM: smoothing before the maxima, m (unset: the model's value).",
    # [carbon]
    "n_draws": "Monte Carlo draws (use 10000 for reported numbers: ART-TREES).",
    "agb_model": "Aboveground biomass allometry.",
    "jucker_biome": "Biome of the Jucker 2017 crown-height-to-DBH fit.",
    "hd_model": "Height-diameter model of trees without a CHM/DSM height.",
    "hd_environmental_stress_e": "Chave 2014 E of the site (heights without CHM/DSM); unset: E 0, SD 0.5.",
    "hd_e_sd": "SD of E (unset: 0.5 when E is not set, 0.1 when it is).",
    "hd_local": "Local height-diameter fit a,b,c,rse: ln H = a + b ln D + c (ln D)^2 (H m, D cm).",
    "hd_calibrate": "Without E or a local fit: shift the H-D curve to the trees with a measured height.",
    "wood_density_csv": "Wood density table (CSV) whose rows replace the built-in ones.",
    "wood_density_region": "Regional wood density default where neither taxon nor stand resolves.",
    "ecozone": "FAO ecological zone of the root-to-shoot ratio (IPCC 2006 Table 4.4).",
    "root_shoot_ratio": "Root-to-shoot ratio R (unset: from the ecozone table).",
    "root_shoot_rel_sd": "Relative SD of R.",
    "carbon_fraction": "Carbon fraction of dry biomass: one number, or angiosperm=0.47,gymnosperm=0.47.",
    "carbon_fraction_sd": "SD of the carbon fraction.",
    "height_rel_sd": "CHM height error per tree, relative SD.",
    "crown_diameter_rel_sd": "Crown diameter error per tree, relative SD.",
    "height_bias_rel_sd": "Systematic CHM height bias of the run (shared), relative SD.",
    "crown_diameter_bias_rel_sd": "Systematic crown-diameter bias of the segmentation (shared), relative SD.",
    "wood_density_tree_rel_sd": "Tree-to-tree wood density within a taxon, relative SD.",
    "wood_density_shared": "The table value's error is shared by a taxon's trees (off: per tree).",
    "jucker_dbh_residual_sd": "Residual SD (log scale) of the Jucker 2017 DBH fit.",
    "components": "Error sources in the Monte Carlo (comma-separated).",
    "chave_param": "Parameter error of the Chave 2014 fit: {rel_sd, shared_rel_sd, df} (config file only).",
    "jucker_dbh_param": "Parameter error of the Jucker DBH fit: {rel_sd, shared_rel_sd, df} (config only).",
    "jucker_agb_param": "Parameter error of the Jucker AGB fit: {rel_sd, shared_rel_sd, df} (config only).",
}

#: flag spellings other than ``--<key with dashes>`` (first = the main one)
FLAGS: dict[str, tuple[str, ...]] = {
    "out_dir": ("--out",),
    "use_species_model": ("--species/--no-species",),
    "hd_environmental_stress_e": ("--hd-e",),
    "n_draws": ("--n-draws", "--draws"),
}

#: keys whose values are files (relative paths in a config file are relative to that file)
PATH_KEYS = {"ortho", "out_dir", "chm", "dtm", "dsm", "crown_model", "species_model", "plots",
             "wood_density_csv"}


@dataclass(frozen=True)
class Option:
    """One run option: ``key`` (unique), its ``section`` ("", "postprocess", "carbon"), value ``kind``
    (str, int, float, bool, path, bands, mapping, list), default, help, allowed ``choices``."""

    key: str
    section: str
    kind: str
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    optional: bool = True  # None allowed (unset)

    @property
    def flags(self) -> tuple[str, ...]:
        return FLAGS.get(self.key, ("--" + self.key.replace("_", "-"),))


def _kind(hint: Any) -> tuple[str, bool]:
    """(kind, optional) of a type hint."""
    optional = False
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0] if len(args) == 1 else hint
        origin = typing.get_origin(hint)
    if hint is bool:
        return "bool", optional
    if hint is int:
        return "int", optional
    if hint is float:
        return "float", optional
    if hint is str:
        return "str", optional
    if hint is Path:
        return "path", optional
    if origin is tuple:
        return "bands", optional
    if origin in (dict, Mapping) or hint is dict:
        return "mapping", optional
    if origin in (frozenset, set, list) or hint in (frozenset, set, list):
        return "list", optional
    return "object", optional


def _choices() -> dict[str, tuple[str, ...]]:
    from pipeline.carbon.allometry import HD_MODELS, JUCKER_BIOMES
    from pipeline.carbon.estimate import AGB_MODELS, MC_COMPONENTS
    from pipeline.carbon.factors import ROOT_SHOOT_TABLE
    from pipeline.carbon.wood_density import REGIONAL_DEFAULTS_GCM3

    return {"agb_model": tuple(AGB_MODELS), "jucker_biome": tuple(JUCKER_BIOMES),
            "hd_model": HD_MODELS,
            "ecozone": tuple(ROOT_SHOOT_TABLE), "wood_density_region": tuple(REGIONAL_DEFAULTS_GCM3),
            "components": tuple(sorted(MC_COMPONENTS))}


_OPTIONS: dict[str, Option] | None = None


def options() -> dict[str, Option]:
    """Every option by key, in order: InventoryConfig fields, [postprocess], [carbon] (generated)."""
    global _OPTIONS
    if _OPTIONS is not None:
        return _OPTIONS
    from pipeline.carbon.estimate import CarbonConfig
    from pipeline.crowns import DEFAULTS as POSTPROCESS_DEFAULTS
    from pipeline.inventory import InventoryConfig

    choices = _choices()
    table: dict[str, Option] = {}
    hints = typing.get_type_hints(InventoryConfig)
    for f in dataclasses.fields(InventoryConfig):
        if f.name in _SECTION_FIELDS:
            continue
        kind, optional = _kind(hints[f.name])
        kind = "path" if f.name in PATH_KEYS else kind
        default = f.default if f.default is not dataclasses.MISSING else None
        table[f.name] = Option(f.name, "", kind, default, HELP.get(f.name, f.metadata.get("help", "")),
                               optional=optional or default is None)
    for key in POSTPROCESS_DEFAULTS:
        table[key] = Option(key, "postprocess", "float", None, HELP.get(key, ""))
    hints = typing.get_type_hints(CarbonConfig)
    defaults = CarbonConfig()
    for f in dataclasses.fields(CarbonConfig):
        if f.name in _CARBON_INTERNAL:
            continue
        kind, optional = _kind(hints[f.name])
        kind = "path" if f.name in PATH_KEYS else kind
        default = getattr(defaults, f.name)
        if kind == "list":
            default = sorted(default)
        elif dataclasses.is_dataclass(default):
            kind, default = "object", dataclasses.asdict(default)
        table[f.name] = Option(f.name, "carbon", kind, default, HELP.get(f.name, f.metadata.get("help", "")),
                               choices=choices.get(f.name, ()), optional=optional)
    _OPTIONS = table
    return table


def _where(source: str) -> str:
    return f" ({source})" if source else ""


def unknown_key_error(key: str, source: str = "", section: str | None = None) -> InputError:
    """One line naming an unknown key, the closest known one and the allowed keys."""
    table = options()
    allowed = [o.key for o in table.values() if section is None or o.section == section] + (
        [s for s in SECTIONS if s] if not section else [])
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return InputError(f"unknown option {key!r}{_where(source)}; {hint}allowed: {', '.join(allowed)} "
                      "(template: forest-inventory config --print-defaults)")


def available_cores() -> int:
    """CPU cores this process may use (affinity mask on Linux)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _bad(opt: Option, value: Any, source: str, must: str) -> InputError:
    return InputError(f"option {opt.key} = {value!r}{_where(source)}: {must}")


def _parse_number(opt: Option, value: Any, source: str, cast: type) -> Any:
    if isinstance(value, bool):
        raise _bad(opt, value, source, f"must be a number ({cast.__name__})")
    try:
        number = cast(value)
    except (TypeError, ValueError):
        raise _bad(opt, value, source, f"must be a number ({cast.__name__})") from None
    if cast is int and isinstance(value, float) and value != number:
        raise _bad(opt, value, source, "must be a whole number")
    if cast is float and not math.isfinite(number):
        raise _bad(opt, value, source, "must be a finite number")
    return number


def parse_value(opt: Option, value: Any, source: str = "") -> Any:
    """``value`` (from TOML, a flag's text or Python) as the option's type, checked; None stays None."""
    if value is None:
        if not opt.optional:
            raise _bad(opt, value, source, "must be set")
        return None
    if opt.kind == "bool":
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        if not isinstance(value, bool):
            raise _bad(opt, value, source, "must be true or false")
        return value
    if opt.kind == "int":
        return _parse_number(opt, value, source, int)
    if opt.kind == "float":
        return _parse_number(opt, value, source, float)
    if opt.kind in ("str", "path"):
        if not isinstance(value, str | os.PathLike) or not str(value):
            what = "a file path" if opt.kind == "path" else "a non-empty text"
            raise _bad(opt, value, source, f"must be {what}")
        value = str(value) if opt.kind == "str" else Path(value)
        if opt.choices and value not in opt.choices:
            raise _bad(opt, value, source, f"allowed: {', '.join(opt.choices)}")
        return value
    if opt.kind == "bands":
        parts = value.split(",") if isinstance(value, str) else value
        try:
            bands = tuple(int(b) for b in parts)
        except (TypeError, ValueError):
            bands = ()
        if len(bands) != 3 or min(bands) < 1:
            raise _bad(opt, value, source, "must name three 1-based bands (red,green,blue), e.g. 1,2,3")
        return bands
    if opt.kind == "list":
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if not isinstance(items, list | tuple | set | frozenset) or not all(isinstance(v, str)
                                                                           for v in items):
            raise _bad(opt, value, source, "must be a list of names")
        bad = sorted(set(items) - set(opt.choices)) if opt.choices else []
        if bad:
            raise _bad(opt, value, source, f"unknown {', '.join(bad)}; allowed: {', '.join(opt.choices)}")
        return sorted(items)
    if opt.kind == "mapping":
        return _parse_mapping(opt, value, source)
    if not isinstance(value, Mapping | list | tuple):
        raise _bad(opt, value, source, "must be a table (see forest-inventory config --print-defaults)")
    return dict(value) if isinstance(value, Mapping) else list(value)


def _parse_mapping(opt: Option, value: Any, source: str) -> dict[str, float]:
    """carbon_fraction / hd_local: a table, ``k=v,k=v`` text, or (carbon_fraction) one number for all."""
    if opt.key == "hd_local" and isinstance(value, str | list | tuple) and not (
            isinstance(value, str) and "=" in value):
        parts = value.split(",") if isinstance(value, str) else list(value)
        try:
            numbers = [float(v) for v in parts]
        except (TypeError, ValueError):
            numbers = []
        if len(numbers) != 4:
            raise _bad(opt, value, source, "needs four numbers a,b,c,rse (ln H = a + b ln D + c (ln D)^2), "
                       "e.g. 0.9,0.7,0,0.2")
        return dict(zip(("a", "b", "c", "rse"), numbers, strict=True))
    if opt.key == "carbon_fraction" and (isinstance(value, int | float) and not isinstance(value, bool) or
                                         isinstance(value, str) and "=" not in value):
        number = _parse_number(opt, value, source, float)
        return {"angiosperm": number, "gymnosperm": number}
    if isinstance(value, str):
        pairs = [p.split("=", 1) for p in value.split(",") if p.strip()]
        if any(len(p) != 2 for p in pairs):
            raise _bad(opt, value, source, "must be key=value pairs, e.g. angiosperm=0.47,gymnosperm=0.49")
        value = {k.strip(): v.strip() for k, v in pairs}
    if not isinstance(value, Mapping):
        raise _bad(opt, value, source, "must be a table of numbers")
    allowed = {"carbon_fraction": ("angiosperm", "gymnosperm"),
               "hd_local": ("a", "b", "c", "rse", "intercept_sd")}.get(opt.key)
    out = {}
    for k, v in value.items():
        if allowed and k not in allowed:
            raise _bad(opt, dict(value), source, f"unknown key {k!r}; allowed: {', '.join(allowed)}")
        try:
            out[str(k)] = float(v)
        except (TypeError, ValueError):
            raise _bad(opt, dict(value), source, f"{k} must be a number") from None
    return out


#: value checks beyond the type: (test, what the value must be)
_RANGES: dict[str, tuple[Any, str]] = {
    "batch_size": (lambda v: v >= 1, "must be at least 1"),
    "tiles_per_group": (lambda v: v >= 1, "must be at least 1"),
    "cell_m": (lambda v: v > 0, "must be above 0 (metres)"),
    "n_draws": (lambda v: v >= 2, "must be at least 2 (1000 by default, 10000 for reporting)"),
    "fg_threshold": (lambda v: 0 <= v <= 1, "must lie in 0-1"),
    "interior_threshold": (lambda v: 0 <= v <= 1, "must lie in 0-1"),
    "min_score": (lambda v: 0 <= v <= 1, "must lie in 0-1"),
    "min_area_m2": (lambda v: v >= 0, "must be 0 or more (m²)"),
    "seed_min_distance_m": (lambda v: v >= 0, "must be 0 or more (m)"),
    "chm_min_height_m": (lambda v: v >= 0, "must be 0 or more (m)"),
    "chm_smooth_m": (lambda v: v >= 0, "must be 0 or more (m)"),
    "root_shoot_ratio": (lambda v: 0 < v < 2, "must lie between 0 and 2"),
    "carbon_fraction": (lambda v: all(0.3 <= x <= 0.6 for x in v.values()), "must lie in 0.3-0.6"),
}


def check_value(opt: Option, value: Any, source: str = "") -> Any:
    """``parse_value`` plus the option's range; ``threads`` within this machine's cores."""
    value = parse_value(opt, value, source)
    if value is None:
        return value
    if opt.key == "threads":
        cores = available_cores()
        if not 1 <= value <= cores:
            raise _bad(opt, value, source, f"this machine has {cores} CPU core(s): use 1 to {cores}, or "
                       "leave it unset for all cores")
    if opt.kind in ("int", "float") and opt.key.endswith("_sd") and value < 0:
        raise _bad(opt, value, source, "must be 0 or more")
    test = _RANGES.get(opt.key)
    if test is not None and not test[0](value):
        raise _bad(opt, value, source, test[1])
    return value


def flatten(doc: Mapping[str, Any], source: str = "") -> dict[str, Any]:
    """Flat ``{key: value}`` from a nested (``{"carbon": {...}}``) or flat mapping; unknown keys and keys in
    the wrong section raise InputError. Values are not checked here."""
    table = options()
    flat: dict[str, Any] = {}
    for key, value in doc.items():
        if key in _SECTION_FIELDS and isinstance(value, Mapping):
            for sub, subvalue in value.items():
                opt = table.get(sub)
                if opt is None or opt.section != key:
                    raise unknown_key_error(sub, f"[{key}]{' of ' + source if source else ''}", section=key)
                flat[sub] = subvalue
            continue
        if key not in table:
            raise unknown_key_error(key, source)
        flat[key] = value
    return flat


def check_options(doc: Mapping[str, Any], source: str = "",
                  base_dir: Path | None = None) -> dict[str, Any]:
    """Flat, checked ``{key: value}`` of ``doc`` (nested or flat). ``base_dir``: folder that relative paths
    are relative to (a config file's folder)."""
    table = options()
    out = {}
    for key, value in flatten(doc, source).items():
        value = check_value(table[key], value, source)
        if base_dir is not None and isinstance(value, Path) and not value.is_absolute():
            value = base_dir / value
        out[key] = value
    return out


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The checked options of a TOML config file (relative paths resolved against its folder)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: config file not found; write one with forest-inventory config "
                         f"--print-defaults > {path.name}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the config file ({exc}); pass a UTF-8 TOML file") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path}: not valid TOML ({exc}); fix that line (template: forest-inventory config "
                         "--print-defaults)") from None
    return check_options(doc, str(path), base_dir=path.parent)


def make_config(values: Mapping[str, Any], source: str = ""):
    """``InventoryConfig`` from checked or raw options (flat or nested); needs ``ortho`` and ``out_dir``."""
    from pipeline.inventory import InventoryConfig

    flat = check_options(values, source)
    for key in ("ortho", "out_dir"):
        if flat.get(key) is None:
            raise InputError(f"option {key} is not set{_where(source)}: give it "
                             + ("as the ORTHO argument" if key == "ortho" else "with --out"))
    table = options()
    top = {k: v for k, v in flat.items() if table[k].section == ""}
    post = {k: v for k, v in flat.items() if table[k].section == "postprocess" and v is not None}
    carbon = {k: v for k, v in flat.items() if table[k].section == "carbon" and v is not None}
    if "hd_local" in carbon and "hd_model" not in carbon:
        carbon["hd_model"] = "local"  # a local fit given is the fit wanted
    return InventoryConfig(**top, postprocess=post, carbon=carbon)


def to_jsonable(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Flat options with JSON values (paths as text, bands as a list): what a flow parameter can hold."""
    return {k: _jsonable(v) for k, v in flat.items()}


def _jsonable(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return str(value)
    if isinstance(value, tuple | frozenset | set):
        return sorted(value) if isinstance(value, frozenset | set) else list(value)
    return value


def check_config(config: Any) -> None:
    """Check an ``InventoryConfig`` built in Python (fields, [postprocess] and [carbon] keys, values, and
    that ``CarbonConfig`` accepts the carbon options): raises InputError before any work."""
    doc = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
           if f.name not in _SECTION_FIELDS}
    doc = {k: v for k, v in doc.items() if k in options()}
    check_options(doc, "InventoryConfig")
    for section in sorted(_SECTION_FIELDS):
        value = getattr(config, section) or {}
        if not isinstance(value, Mapping):
            raise InputError(f"InventoryConfig.{section} must be a dict of options (see forest-inventory "
                             "config --print-defaults)")
        if section == "postprocess":  # the crown thresholds' aliases (min_crown_area_m2, ...) are allowed
            from pipeline.crowns import postprocess_kwargs

            renamed = {}
            for key, item in value.items():
                try:
                    renamed[next(iter(postprocess_kwargs({key: 0.0})))] = item
                except InputError:
                    raise unknown_key_error(key, "InventoryConfig.postprocess", section=section) from None
            value = renamed
        check_options({section: dict(value)}, "InventoryConfig")
    carbon_config(config.carbon)


def carbon_config(carbon: Mapping[str, Any], **run: Any):
    """``CarbonConfig(**carbon, **run)``; an unknown key is an InputError naming it (not a TypeError)."""
    from pipeline.carbon.estimate import CarbonConfig

    fields = {f.name for f in dataclasses.fields(CarbonConfig)}
    for key in carbon:
        if key not in fields:
            raise unknown_key_error(key, "[carbon]", section="carbon")
    return CarbonConfig(**{**dict(carbon), **run})


# --- the commented template (forest-inventory config --print-defaults) ---


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | os.PathLike):
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(type(value))


def config_template() -> str:
    """A commented TOML file of every option at its default; unset options are commented out.

    Loading it back gives the defaults (``load_config_file``)."""
    lines = ["# forest-inventory run options (forest-inventory run ORTHO --out OUT --config this.toml).",
             "# Flags on the command line override this file; relative paths are relative to this file.",
             "# Unset options (commented out) take the default named in their comment.", ""]
    for section in SECTIONS:
        if section:
            lines += ["", f"[{section}]"]
        for opt in options().values():
            if opt.section != section:
                continue
            text = opt.help or "see ARCHITECTURE.md"
            if opt.choices:
                text += f" Allowed: {', '.join(opt.choices)}."
            lines.append(f"# {text}")
            if opt.default is None:
                lines.append(f"# {opt.key} =")
            else:
                lines.append(f"{opt.key} = {_toml_value(opt.default)}")
    return "\n".join(lines) + "\n"
