"""One config per experiment, score_sde's habit: ``experiments/configs/<name>.py`` defines ``get_config()``.

A config is a dataclass of the experiment it runs (:class:`experiments.images.ImageConfig`,
:class:`experiments.toy2d.Toy2DConfig`, :class:`experiments.distill.DistillConfig`,
:class:`experiments.differentiable.DifferentiableConfig`); its class names the experiment.
Load one by name (``load("digits_cfm")``) or from any Python file that defines ``get_config()``
(``load("path/to/my_config.py")``), and override any field from the command line::

    jaxgen train digits_cfm --set steps=2000 --set channels=64
    jaxgen train my_configs/wide_unet.py --set sampler=dpm_solver_pp:order=3
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import pathlib
import typing
from typing import Any

CONFIG_DIR = pathlib.Path(__file__).resolve().parent


def names() -> list[str]:
    """The named configs (the files of this folder)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_"))


def load(name_or_path: str):
    """The config of a name (``digits_cfm``) or of a Python file defining ``get_config()``."""
    text = str(name_or_path)
    if text.endswith(".py") or "/" in text or "\\" in text:
        path = pathlib.Path(text).expanduser()
        if not path.is_file():
            raise ValueError(f"config file {text!r} not found; pass a named config ({', '.join(names())}) or the "
                             "path of a Python file that defines get_config().")
        spec = importlib.util.spec_from_file_location(f"_jaxgen_config_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        where = str(path)
    else:
        if text not in names():
            raise ValueError(f"unknown experiment {text!r}; choose from {', '.join(names())} (`jaxgen list`), or "
                             "pass the path of a Python config file that defines get_config().")
        module = importlib.import_module(f"experiments.configs.{text}")
        where = f"experiments/configs/{text}.py"
    if not callable(getattr(module, "get_config", None)):
        raise ValueError(f"{where} must define get_config() returning an experiment config.")
    cfg = module.get_config()
    if not dataclasses.is_dataclass(cfg) or not hasattr(cfg, "experiment"):
        raise ValueError(f"get_config() of {where} must return an experiment config (ImageConfig, Toy2DConfig, "
                         f"DistillConfig or DifferentiableConfig), got {type(cfg).__name__}.")
    return cfg


def _field_type(cfg, name: str):
    hints = typing.get_type_hints(type(cfg))
    return hints.get(name)


def parse_override(cfg, item: str):
    """Apply one ``name=value`` override to a config dataclass, parsing the value with the field's type."""
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like name=value (e.g. steps=1000).")
    key, value = item.split("=", 1)
    key = key.strip()
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    if key not in fields:
        raise ValueError(f"unknown config field {key!r} of {type(cfg).__name__}; fields: {', '.join(fields)}.")
    current = getattr(cfg, key)
    try:
        new = _parse(value, current, _field_type(cfg, key))
    except (TypeError, ValueError):
        raise ValueError(f"cannot parse {key}={value!r} as the type of {key} (now {current!r}).") from None
    return dataclasses.replace(cfg, **{key: new})


def _parse(value: str, current: Any, hint: Any):
    text = value.strip()
    optional = hint is not None and type(None) in typing.get_args(hint)
    if optional and text.lower() in ("none", ""):
        return None
    if isinstance(current, tuple) and current and isinstance(current[0], tuple):  # e.g. sample_ts=0|0,0.5
        return tuple(tuple(float(p) for p in group.replace("(", "").replace(")", "").split(",") if p.strip())
                     for group in text.split("|"))
    if isinstance(current, tuple):
        parts = [p for p in text.replace("(", "").replace(")", "").split(",") if p.strip()]
        cast = type(current[0]) if current else float
        return tuple(cast(p) for p in parts)
    if isinstance(current, bool):
        if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError(text)
        return text.lower() in ("1", "true", "yes")
    if current is None:  # an optional number
        return float(text)
    if isinstance(current, int):
        return int(text)
    return type(current)(text)


def apply_overrides(cfg, overrides=()):
    """``cfg`` with every ``name=value`` of ``overrides`` applied (see :func:`parse_override`)."""
    for item in overrides:
        cfg = parse_override(cfg, item)
    return cfg


def get_config(name_or_path: str, overrides=()):
    """:func:`load` then :func:`apply_overrides`."""
    return apply_overrides(load(name_or_path), overrides)


__all__ = ["names", "load", "get_config", "apply_overrides", "parse_override", "CONFIG_DIR"]
