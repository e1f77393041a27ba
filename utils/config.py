"""Configuration: JSON files read with their errors located, merged once with the command-line flags into one
plain dict, and `--cfg section.key.subkey=value` overrides typed by the JSON value they replace."""

import copy
import json
import os

from utils.errors import UserError


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


def parse_value(text: str, old, key: str):
    """`text` as the type of `old` (the JSON value it replaces): bool, int, float, str, or JSON for lists/dicts."""
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
        if type(value) is not type(old):
            raise ValueError
        return value
    except ValueError:
        raise UserError(f"--cfg {key}={text}: expected a value of type {type(old).__name__} like "
                        f"{json.dumps(old)}") from None


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


def merge_config(flags: dict, config_dir: str, sections: tuple = ("config", "data", "model", "loss")) -> dict:
    """One plain dict: the flags at the top level, each config/<section>.json under its section name, then the
    `--cfg` overrides (flags["cfg"], a list) applied to the sections."""
    cfg = copy.deepcopy(flags)
    for section in sections:
        cfg[section] = load_json(os.path.join(config_dir, f"{section}.json"))
    for override in flags.get("cfg") or []:
        apply_override(cfg, override, sections)
    return cfg
