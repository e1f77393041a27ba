"""Configuration: JSON files read with their errors located, merged once with the command-line flags into one
plain dict, and `--cfg section.key.subkey=value` overrides typed by the JSON value they replace."""

import copy
import json
import math
import os
from collections.abc import Callable
from typing import NamedTuple

from utils.errors import UserError

CONFIG_SECTIONS = ("config", "data", "model", "loss")  # config/<section>.json, merged under the section's name


def load_json(path: str):
    """Parse a JSON file; a syntax error is reported with the file, line and column."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"config file {path} not found: restore it from the repository") from None
    except json.JSONDecodeError as error:
        raise UserError(f"config file {path} is not valid JSON: {error.msg} at line {error.lineno} column "
                        f"{error.colno}") from None


JSON_KINDS = {bool: "true or false", int: "a number", float: "a number", str: "a string", list: "a list",
              dict: "a dict", type(None): "null"}  # how a value of each JSON type is named in errors
# dicts whose keys are data, not settings: any keys, each value of the shape of the default's values ("splits" by
# version, BEVSeg's "classes" by class name, "loaders" by dataset type and then by app mode)
USER_KEYED = ("splits", "classes", "loaders")


def shape_difference(value, default, key: str, where: str = "") -> str | None:
    """Where `value` (a parsed JSON value) differs in type or shape from `default`, the JSON value it replaces at the
    dotted `key`, as "<where> = <value> is not <what>" (where: the subscripts from the top, e.g. ["v1.0-mini"][0]);
    None if it has the default's shape. The rule, recursively: a number is a number (whether an int is needed is the
    range checks' to say: check_values), a bool a bool, a string a string; a list a list of any length (cameras),
    each element of the shape of one of the default's (of any shape if the default is empty); a dict of USER_KEYED
    (and a dict inside "loaders") has any keys, each value of the shape of the default's values; any other dict has
    exactly the default's keys, each value of its own default's shape."""
    def number(item) -> bool:
        return isinstance(item, int | float) and not isinstance(item, bool)

    if not (number(value) and number(default)) and type(value) is not type(default):
        return (f"{where or 'the value'} = {json.dumps(value)} is not {JSON_KINDS[type(default)]} like "
                f"{json.dumps(default)}")
    if isinstance(default, list):
        for index, element in enumerate(value):
            differences = [shape_difference(element, option, key, f"{where}[{index}]") for option in default]
            if default and None not in differences:
                return differences[0]
    elif isinstance(default, dict):
        names = key.split(".")
        keyed_by_data = names[-1] in USER_KEYED or (len(names) > 1 and names[-2] == "loaders")
        if not keyed_by_data:
            missing, unknown = [k for k in default if k not in value], [k for k in value if k not in default]
            if missing or unknown:
                wrong = (f"lacks {', '.join(map(json.dumps, missing))}" if missing
                         else f"has the unknown key {json.dumps(unknown[0])}")
                return f"{where or 'the dict'} {wrong} (keys there: {', '.join(map(json.dumps, default))})"
        for name, element in value.items():
            options = list(default.values()) if keyed_by_data else [default[name]]
            differences = [shape_difference(element, option, f"{key}.{name}", f"{where}[{json.dumps(name)}]")
                           for option in options]
            if options and None not in differences:
                return differences[0]
    return None


def parse_value(text: str, old, key: str):
    """`text` as the type of `old` (the JSON value it replaces): bool, int, float, str, or JSON of the shape of
    `old` for lists and dicts (shape_difference says what that allows)."""
    expected = f"--cfg {key}={text}: expected a value of type {type(old).__name__} like {json.dumps(old)}"
    try:
        if isinstance(old, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if isinstance(old, int):
            return int(text)
        if isinstance(old, float):
            return float(text)
        if isinstance(old, str):
            return text
        value = json.loads(text)
    except ValueError:
        raise UserError(expected) from None
    if type(value) is not type(old):
        raise UserError(expected)
    difference = shape_difference(value, old, key)
    if difference:
        raise UserError(f"{expected}: {difference}")
    return value


def apply_override(cfg: dict, override: str, sections: tuple) -> None:
    """Apply one `section.key.subkey=value` override to cfg in place; the key must exist already."""
    if "=" not in override:
        raise UserError(f"--cfg {override}: expected KEY=VALUE, e.g. model.Yolo.backbone=resnet34")
    key, text = override.split("=", 1)
    parts = key.split(".")
    if parts[0] not in sections:
        raise UserError(f"--cfg {key}: the key must start with one of {', '.join(sections)} (the config/*.json file)")
    node = cfg
    for depth, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            known = ", ".join(node) if isinstance(node, dict) else "none: it is a value"
            raise UserError(f"--cfg {key}: unknown key '{'.'.join(parts[:depth + 1])}' (keys there: {known})")
        if depth == len(parts) - 1:
            node[part] = parse_value(text, node[part], key)
        else:
            node = node[part]


def deep_merge(base: dict, own: dict) -> dict:
    """`base` with `own`'s keys on top: dicts merged key by key, any other value replaced."""
    merged = copy.deepcopy(base)
    for key, value in own.items():
        both_dicts = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = deep_merge(merged[key], value) if both_dicts else copy.deepcopy(value)
    return merged


def resolve_inherits(entries: dict, path: str) -> dict:
    """The top-level entries of a config file, each entry with an "inherit": "<other entry>" key replaced by that
    entry (itself resolved) with its own keys on top, so that a task reuses another task's settings and writes only
    what differs (e.g. a data.json section that reads the same dataset as "2DObjDet")."""
    resolved = {}

    def resolve(name: str, chain: tuple) -> dict:  # chain: the sections whose inheritance led here, ending in name
        if name in resolved:
            return resolved[name]
        entry = entries[name]
        if isinstance(entry, dict) and "inherit" in entry:
            parent = entry["inherit"]
            others = [key for key in entries if key != name and isinstance(entries[key], dict)]
            if not isinstance(parent, str):
                raise UserError(f"config file {path}: {name}.inherit = {json.dumps(parent)} is not a section name: "
                                f"write one name as a string, one of {', '.join(map(json.dumps, others)) or '(none)'}")
            if parent in chain:
                raise UserError(f"config file {path}: {name}.inherit = {json.dumps(parent)} makes a cycle "
                                f"({' -> '.join((*chain, parent))}): let one of them inherit from none")
            if parent not in entries or not isinstance(entries[parent], dict):
                raise UserError(f"config file {path}: {name}.inherit = {json.dumps(parent)} is not a section of the "
                                f"file: name one of {', '.join(others) or '(none: add that section)'}")
            entry = deep_merge(resolve(parent, (*chain, parent)), {k: v for k, v in entry.items() if k != "inherit"})
        resolved[name] = entry
        return entry

    return {name: resolve(name, (name,)) for name in entries}


def merge_config(flags: dict, config_dir: str, sections: tuple = CONFIG_SECTIONS) -> dict:
    """One plain dict: the flags at the top level, each config/<section>.json under its section name (its
    "inherit" keys resolved), then the `--cfg` overrides (flags["cfg"], a list) applied to the sections."""
    cfg = copy.deepcopy(flags)
    for section in sections:
        path = os.path.join(config_dir, f"{section}.json")
        entries = load_json(path)
        cfg[section] = resolve_inherits(entries, path) if isinstance(entries, dict) else entries
    for override in flags.get("cfg") or []:
        apply_override(cfg, override, sections)
    return cfg


class Rule(NamedTuple):
    """What a configuration value must be: `check(value)` is True for a good value; `expected` says so in words."""

    check: Callable[[object], bool]
    expected: str


def is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def number(low: float | None = None, high: float | None = None, *, integer: bool = False, low_open: bool = False,
           high_open: bool = False) -> Rule:
    """A number (an int if `integer`) between `low` and `high`, each bound included unless `*_open`."""

    def check(value) -> bool:
        if not is_number(value) or (integer and not isinstance(value, int)):
            return False
        above = low is None or (value > low if low_open else value >= low)
        below = high is None or (value < high if high_open else value <= high)
        return above and below

    bounds = [f"{'>' if low_open else '>='} {low:g}"] if low is not None else []
    bounds += [f"{'<' if high_open else '<='} {high:g}"] if high is not None else []
    return Rule(check, f"{'an integer' if integer else 'a number'}{' ' + ' and '.join(bounds) if bounds else ''}")


def one_of(*choices) -> Rule:
    return Rule(lambda value: value in choices, f"one of {', '.join(json.dumps(c) for c in choices)}")


def list_of(item: Rule, length: int | None = None) -> Rule:
    """A list of `length` items (one or more if None), each passing `item`."""

    def check(value) -> bool:
        sized = len(value) == length if length is not None else len(value) > 0
        return isinstance(value, list) and sized and all(item.check(element) for element in value)

    return Rule(check, f"a list of {length or 'one or more'} values, each {item.expected}")


def multiple_of(step: int, why: str) -> Rule:
    return Rule(lambda value: isinstance(value, int) and not isinstance(value, bool) and value >= step
                and value % step == 0, f"a positive multiple of {step} ({why})")


FLAG = Rule(lambda value: isinstance(value, bool), "true or false")
TEXT = Rule(lambda value: isinstance(value, str) and value != "", "a non-empty string")
NUMBER_RANGE = Rule(lambda value: isinstance(value, list) and len(value) == 2 and all(map(is_number, value))
                    and value[0] < value[1], "[low, high] with low < high")
# channels of a layer followed by GroupNorm(min(32, channels)): the groups must divide the channels
GROUP_NORM_CHANNELS = Rule(lambda value: isinstance(value, int) and not isinstance(value, bool) and value >= 1
                           and (value <= 32 or value % 32 == 0), "an integer from 1 to 32, or a multiple of 32")


def lookup(cfg: dict, key: str):
    """The value at the dotted `key` of cfg; a missing key is a UserError naming the config file."""
    node = cfg
    for depth, part in enumerate(key.split(".")):
        if not isinstance(node, dict) or part not in node:
            raise UserError(f"config/{key.split('.')[0]}.json has no '{'.'.join(key.split('.')[1:depth + 1])}': "
                            f"restore the key from the repository's file")
        node = node[part]
    return node


def check_values(cfg: dict, rules: dict, within: str = "") -> None:
    """Check every value named in `rules` ({dotted key: Rule}, the keys within the dotted section `within` of cfg,
    e.g. "model.Yolo") before any work starts; the first bad one is a UserError naming the key, its value and what
    it must be."""
    for relative_key, rule in rules.items():
        key = ".".join(part for part in (within, relative_key) if part)
        value = lookup(cfg, key)
        try:
            good = bool(rule.check(value))
        except (TypeError, ValueError, KeyError, AttributeError, IndexError):  # a value of another shape
            good = False
        if not good:
            section, _, rest = key.partition(".")
            shown = json.dumps(value)
            shown = shown if len(shown) <= 80 else f"{shown[:77]}..."
            raise UserError(f"{rest} = {shown} in config/{section}.json (or --cfg {key}=...): must be "
                            f"{rule.expected}")
