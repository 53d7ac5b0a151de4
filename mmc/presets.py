"""Presets: a YAML file of the settings that differ from params.yaml, overlaid on it in one command.

Mappings merge key by key; a mapping tagged `!replace` (a zoo's member list, a pool) takes the place of the
params file's whole mapping; any other value replaces the params file's value. The params file keeps its
comments and key order (ruamel.yaml round trip) and is written atomically.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.error import CommentMark
from ruamel.yaml.tokens import CommentToken

from mmc import MMCError, check_name, did_you_mean
from mmc.params import HUB_ID, check_params, is_gguf, load_yaml
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


def _load_round_trip(params_path: Path) -> tuple[YAML, CommentedMap]:
    """The params file loaded for a round trip (comments, key order and quotes kept), with one-line errors."""
    if not params_path.is_file():
        raise MMCError(f"params file '{params_path}' does not exist")
    round_trip = YAML()
    round_trip.width = 4096  # keep long flow mappings (zoo members) on one line
    round_trip.preserve_quotes = True  # untouched values are written back as they were ("a,b" stays quoted)
    round_trip.representer.add_representer(
        type(None), lambda representer, _: representer.represent_scalar("tag:yaml.org,2002:null", "null"))
    load_yaml(params_path)  # one-line errors for a file that is not UTF-8 or not YAML
    params = round_trip.load(params_path.read_text(encoding="utf-8"))
    if not isinstance(params, dict):
        raise MMCError(f"params file '{params_path}' must be a mapping of sections (corpus, zoo, losses, ...)")
    return round_trip, params


def _checked_text(round_trip: YAML, params: CommentedMap, where: str) -> str:
    """The edited params as text, checked against the schema (`where` names the edit in errors): before writing."""
    text = io.StringIO()
    round_trip.dump(params, text)
    check_params(yaml.safe_load(text.getvalue()), where)
    return text.getvalue()


def apply_preset(preset_path: str | Path, params_path: str | Path = "params.yaml") -> list[str]:
    """Overlay the preset file on the params file and write it back; returns the dotted names set."""
    params_path = Path(params_path)
    round_trip, params = _load_round_trip(params_path)
    changed = overlay(params, read_preset(preset_path))
    text = _checked_text(round_trip, params, f"{params_path} with preset '{preset_path}'")
    with atomic_path(params_path, None) as tmp:  # the user's own file, rewritten as asked
        tmp.write_text(text, encoding="utf-8")
    return changed


HUB_DEP = "stages/losses.py"  # a hub model's stage depends on its script: the revision pins the model


def pool_entry_for(model: str, family: str, data: str | None = None, revision: str | None = None, *,
                   root: str | Path = ".", **settings) -> tuple[str, dict]:
    """The slug and pool entry of `model` (a hub id, a local model folder or a .gguf file; a path as written in
    params.yaml, relative to the project folder `root`).

    The slug is the model's name (a path's last component without `.gguf`, a hub id's part after the '/'),
    lowercased, with characters other than letters, digits and _ . + - turned into '-'. `dep` is the path itself for
    a local model and `stages/losses.py` for a hub id (its revision pins it). `settings` (per-model engine settings
    such as max_length or device) follow, those that are not None; the schema (`check_params`) judges them.
    """
    local = (is_gguf(model) or (Path(root) / model).exists() or not HUB_ID.match(model)
             or model.count("/") > 1)
    if local and revision is not None:
        raise MMCError(f"a revision pins a hub model; '{model}' is a local model (its stage depends on the path)")
    name = Path(model).name if local else model.rsplit("/", 1)[-1]
    name = name[:-len(".gguf")] if is_gguf(name) else name
    slug = re.sub(r"[^A-Za-z0-9_+-]", "-", name.lower())  # no '.': DVC would split the params key pool.<slug>
    entry = {"model": model, "family": family, "data": data, "revision": revision,
             "dep": model if local else HUB_DEP}
    return slug, entry | {key: value for key, value in settings.items() if value is not None}


def _pool_of(params: CommentedMap, params_path: Path) -> CommentedMap:
    pool = params.get("pool")
    if not isinstance(pool, dict):
        raise MMCError(f"params file '{params_path}' has no pool mapping (pool: slug -> entry)")
    return pool


def add_pool_entry(params_path: str | Path, name: str, entry: dict) -> None:
    """Write `entry` into the params file's pool as `name` (a flow mapping on one line, after the last entry), the
    whole file checked against the schema first, comments and order kept, atomically."""
    params_path = Path(params_path)
    check_name("pool slug", name)
    round_trip, params = _load_round_trip(params_path)
    pool = _pool_of(params, params_path)
    if name in pool:
        raise MMCError(f"the pool of {params_path} already holds '{name}': run `mmc pool remove {name}` first, "
                       f"or choose another name (--name)")
    if not pool:
        pool.fa.set_block_style()  # `pool: {}` grows into one entry a line
    line = CommentedMap(entry)
    line.fa.set_flow_style()
    pool[name] = line
    text = _checked_text(round_trip, params, f"{params_path} with pool entry '{name}'")
    with atomic_path(params_path, None) as tmp:  # the user's own file, rewritten as asked
        tmp.write_text(text, encoding="utf-8")


def _delete_keeping_comments(mapping: CommentedMap, key: str, parent: CommentedMap, parent_key: str) -> None:
    """Delete `key` from a round-trip mapping, keeping the comment lines ruamel attached to it (all but the key's
    own end-of-line comment): they go before the next key, or, after the mapping's last, before the parent's next
    key."""
    keys = list(mapping)
    tokens = mapping.ca.items.pop(key, None) or [None, None, None, None]
    del mapping[key]
    carried = list(tokens[1] or [])  # comment lines above the key
    if tokens[2] is not None and "\n" in tokens[2].value.rstrip("\n"):  # its end-of-line comment, then lines
        rest = tokens[2].value.split("\n", 1)[1]
        carried.append(CommentToken(rest, CommentMark(0)))  # its lines keep their own indentation
    if not carried:
        return
    following = keys[keys.index(key) + 1:]
    if following:
        target, after = mapping, following[0]
    else:
        parents = list(parent)
        later = parents[parents.index(parent_key) + 1:]
        if not later:
            return  # nothing follows the mapping to hang them on
        target, after = parent, later[0]
    slots = target.ca.items.setdefault(after, [None, None, None, None])
    slots[1] = carried + list(slots[1] or [])


def remove_pool_entry(params_path: str | Path, name: str) -> None:
    """Remove the pool entry `name` from the params file, the rest checked against the schema first, comments and
    order kept, atomically."""
    params_path = Path(params_path)
    round_trip, params = _load_round_trip(params_path)
    pool = _pool_of(params, params_path)
    if name not in pool:
        raise MMCError(f"the pool of {params_path} has no entry '{name}'{did_you_mean(name, pool)}")
    _delete_keeping_comments(pool, name, params, "pool")
    text = _checked_text(round_trip, params, f"{params_path} without pool entry '{name}'")
    with atomic_path(params_path, None) as tmp:  # the user's own file, rewritten as asked
        tmp.write_text(text, encoding="utf-8")
