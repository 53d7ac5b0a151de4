"""Presets: a YAML file of the settings that differ from params.yaml, overlaid on it in one command.

Mappings merge key by key; a mapping tagged `!replace` (a zoo's member list, a pool) takes the place of the
params file's whole mapping; any other value replaces the params file's value. The params file keeps its
comments and key order (ruamel.yaml round trip) and is written atomically.
"""

from __future__ import annotations

import io
from pathlib import Path

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

from mmc import MMCError
from mmc.params import check_params, load_yaml
from mmc.store import atomic_path


class Replace(dict):
    """A preset mapping tagged !replace: it replaces the params file's mapping instead of merging into it."""


class _PresetLoader(yaml.SafeLoader):
    pass


_PresetLoader.add_constructor("!replace", lambda loader, node: Replace(loader.construct_mapping(node, deep=True)))


def read_preset(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise MMCError(f"preset '{path}' does not exist")
    try:
        preset = yaml.load(path.read_text(encoding="utf-8"), Loader=_PresetLoader)
    except UnicodeDecodeError as error:
        raise MMCError(f"preset '{path}' is not UTF-8 text ({error.reason} at byte {error.start})") from None
    except yaml.YAMLError as error:
        raise MMCError(f"preset '{path}' is not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(preset, dict):
        raise MMCError(f"preset '{path}' must be a mapping of params sections")
    return preset


def overlay(params: dict, preset: dict, where: str = "") -> list[str]:
    """Overlay `preset` on `params` in place; returns the dotted names of the settings it set."""
    changed = []
    for key, value in preset.items():
        name = f"{where}{key}"
        if isinstance(value, dict) and not isinstance(value, Replace):
            if key not in params or not isinstance(params[key], dict):
                raise MMCError(f"the preset sets '{name}', which params has no section for "
                               f"(tag it !replace to set the whole mapping)")
            changed += overlay(params[key], value, f"{name}.")
        else:
            params[key] = CommentedMap(value) if isinstance(value, Replace) else value
            changed.append(name)
    return changed


def apply_preset(preset_path: str | Path, params_path: str | Path = "params.yaml") -> list[str]:
    """Overlay the preset file on the params file and write it back; returns the dotted names set."""
    params_path = Path(params_path)
    if not params_path.is_file():
        raise MMCError(f"params file '{params_path}' does not exist")
    round_trip = YAML()
    round_trip.width = 4096  # keep long flow mappings (zoo members) on one line
    round_trip.representer.add_representer(
        type(None), lambda representer, _: representer.represent_scalar("tag:yaml.org,2002:null", "null"))
    load_yaml(params_path)  # one-line errors for a file that is not UTF-8 or not YAML
    params = round_trip.load(params_path.read_text(encoding="utf-8"))
    if not isinstance(params, dict):
        raise MMCError(f"params file '{params_path}' must be a mapping of sections (corpus, zoo, losses, ...)")
    changed = overlay(params, read_preset(preset_path))
    text = io.StringIO()
    round_trip.dump(params, text)
    check_params(yaml.safe_load(text.getvalue()), f"{params_path} with preset '{preset_path}'")  # before writing
    with atomic_path(params_path, None) as tmp:  # the user's own file, rewritten as asked
        tmp.write_text(text.getvalue(), encoding="utf-8")
    return changed
