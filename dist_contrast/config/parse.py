"""Reading a config tree: the YAML file, ``section.key=value`` overrides, and the typed build.

Unknown keys and values of the wrong type are :class:`ConfigError` naming the dotted key, with the
closest valid key or choice suggested. Used by :mod:`dist_contrast.config`; the dataclass tree
itself is :mod:`dist_contrast.config.schema`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from dist_contrast.errors import ConfigError
from dist_contrast.files import open_regular, read_errors

# Values that YAML aliases may add to a document once expanded: ample for the anchors people
# write (a shared deepspeed block, a step count), while 9 levels of 10 aliases in 524 bytes
# would expand to 10**9 values on the first copy of the config.
MAX_ALIAS_VALUES = 10_000


class _AliasLoop(Exception):
    """An alias inside the value it refers to (a structure that contains itself)."""


def _expanded_size(node: yaml.Node, memo: dict[int, int], open_: set[int]) -> int:
    """Values ``node`` stands for once every alias in it is expanded (each node counted once
    per reference, over the composed graph, so nothing is expanded); ``memo`` holds the sizes
    of nodes done, ``open_`` those being counted (an alias back into one is a loop)."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in open_:
        raise _AliasLoop
    open_.add(key)
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(child, memo, open_) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(
            _expanded_size(k, memo, open_) + _expanded_size(v, memo, open_) for k, v in node.value
        )
    else:
        size = 1
    open_.discard(key)
    memo[key] = size
    return size


def safe_yaml(text: str | bytes, where: str) -> Any:
    """``yaml.safe_load(text)`` once the document is known to be no alias bomb: the composed
    node graph (aliases are shared nodes there) is measured before anything is constructed.
    A :class:`ConfigError` starting with ``where`` when aliases would add more than
    :data:`MAX_ALIAS_VALUES` values or refer to a value that holds them; invalid YAML raises
    ``yaml.YAMLError`` as ``safe_load`` does, a document nested too deeply RecursionError."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        memo: dict[int, int] = {}
        try:
            total = _expanded_size(node, memo, set())
        except _AliasLoop:
            raise ConfigError(f"{where}: a YAML alias refers to a value that holds it") from None
        if total - len(memo) > MAX_ALIAS_VALUES:
            raise ConfigError(
                f"{where}: YAML aliases expand past {MAX_ALIAS_VALUES:,} values (an alias bomb?); "
                "write the values out"
            )
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _read_config_bytes(path: Path) -> bytes:
    """The bytes of the config file ``path``, read only if it is a regular file (a FIFO would
    wait for a writer forever, a device never ends)."""
    with read_errors(path, ConfigError, "config file"), open_regular(path) as f:
        return f.read()


def read_yaml(path: Path) -> dict[str, Any]:
    data = _read_config_bytes(path)
    try:
        tree = safe_yaml(data, str(path)) or {}
    except RecursionError:  # nesting deeper than the parser's own recursion
        raise ConfigError(f"{path}: the YAML nests too deeply") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return tree


def split_override(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    return key.strip(), value.strip()


def split_top_level(spec: str) -> list[str]:
    """Split on the commas that are not inside braces (``a-{0..9}.tar, b.tar``), stripped."""
    parts, depth, cur = [], 0, []
    for ch in spec:
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def override_value(key: str, value: str) -> Any:
    """The YAML value of an override (``""`` stays an empty string). A ``[...]`` list that is
    not YAML because its items hold brace patterns (``[a/{0..9}.tar, b/{0..3}.tar]``, shard
    lists as docs/data.md writes them) is a list of those strings. Anything else that is not
    YAML is one line (quote the value, or write it as a YAML list)."""
    if value == "":
        return ""
    try:
        return safe_yaml(value, f"override {key}")
    except RecursionError:
        raise ConfigError(f"override {key}: the YAML value nests too deeply") from None
    except yaml.YAMLError as exc:
        text = value.strip()
        if text.startswith("[") and text.endswith("]") and "{" in text:
            return split_top_level(text[1:-1])
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(
            f"override {key}: value {value!r} is not valid YAML ({problem}); quote it, or give a "
            "YAML list such as [a, b]"
        ) from None


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def dotted_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of the dataclass tree ``cls``, sections included."""
    keys: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        dotted = f"{prefix}{f.name}"
        keys.append(dotted)
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(dotted_keys(hints[f.name], dotted + "."))
    return keys


def key_type(cls: type, dotted: str) -> Any:
    """The annotated type of the dotted key of ``cls`` (None for an unknown key)."""
    node: Any = cls
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(node):
            return None
        hints = typing.get_type_hints(node)
        if part not in hints:
            return None
        node = hints[part]
    return node


def typed_override(cls: type, key: str, value: str) -> Any:
    """:func:`override_value`, except that a key typed ``str`` keeps the text as written:
    ``run.name=off`` is the name "off", not YAML's False; ``run.name=2024`` is "2024"."""
    parsed = override_value(key, value)
    if key_type(cls, key) is str and isinstance(parsed, bool | int | float):
        return value
    return parsed


def _unknown_key(dotted: str, root: type) -> ConfigError:
    close = difflib.get_close_matches(dotted, dotted_keys(root), n=1, cutoff=0.5)
    if not close:  # a typo in the section name still has a recognisable key name
        leaf = dotted.rsplit(".", 1)[-1]
        close = [k for k in dotted_keys(root) if k.rsplit(".", 1)[-1] == leaf][:1]
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{dotted}'{hint}")


def build(cls: type, tree: Any, prefix: str, root: type | None = None) -> Any:
    """An instance of the dataclass ``cls`` from ``tree``; ``root`` is the top of the tree (for
    the key suggestions of an unknown key), ``cls`` itself when not given."""
    root = cls if root is None else root
    if not isinstance(tree, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.')}' is a section; give it a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in tree.items():
        if key not in names:
            dotted = f"{prefix}{key}"
            while isinstance(value, dict) and len(value) == 1:  # name the whole dotted key
                ((leaf, value),) = value.items()
                dotted += f".{leaf}"
            raise _unknown_key(dotted, root)
    kwargs = {}
    for name, value in tree.items():
        tp = hints[name]
        dotted = f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build(tp, value if value is not None else {}, dotted + ".", root)
        else:
            kwargs[name] = _coerce(value, tp, dotted)
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, dotted: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"config key '{dotted}' must be {_type_name(tp)}, got {value!r}{hint}")
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            if arm is type(None) and value is None:
                return None
            try:
                return _coerce(value, arm, dotted)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{dotted}' has the wrong type: got {value!r}")
    if origin is dict or tp is dict:
        if isinstance(value, dict):
            return value
    elif origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, list):
            return [_coerce(v, item_tp, f"{dotted}[{i}]") for i, v in enumerate(value)]
    elif tp is Any:
        return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(
        f"config key '{dotted}' must be {_type_name(tp)}, got {type(value).__name__} {value!r}"
    )
