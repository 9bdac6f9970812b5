"""The one config mechanism of agvm-ds and ltcr: typed sections on pydantic v2, YAML with YAML 1.2 numbers,
``key.sub=value`` overrides, and one translator of pydantic's errors into the projects' one-line style.

Why pydantic dataclasses: a section declares its types, ranges and choices once, on the field
(``Annotated[int, Field(ge=1)]``, ``Literal[...]``), pydantic checks them, and the class stays a frozen
dataclass (``dataclasses.asdict``/``replace``, hashing, attribute access) for the code that uses it.
Why a translator: pydantic's messages span lines and name locations as tuples; a user who mistyped a
YAML key wants one line naming the dotted key, the value and what is allowed::

    data.batch_size_per_rank=0: expected an integer >= 1
    optimizer.name='adam': expected one of ['sgd', 'adamw', 'lamb']
    data: unknown key(s) ['data.batchsize']; valid keys are [...]
"""
from __future__ import annotations

import copy
import dataclasses
import os
import re
import typing
from pathlib import Path
from typing import IO, Annotated, Any, Callable, Literal, Mapping, Optional, Sequence, TypeVar, Union

import annotated_types
import pydantic.dataclasses
import yaml
from pydantic import BeforeValidator, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ArgsKwargs, PydanticCustomError, core_schema

__all__ = [
    "Count", "Expected", "Items", "PositiveCount", "apply_overrides", "build", "invalid", "parse_overrides",
    "parse_yaml", "read_config", "read_yaml_mapping", "reject_unknown_keys", "section", "yaml_problem",
]

T = TypeVar("T")

#: Every section: a typo is an error, a bool is not an int (nor ``2.0``, nor ``"3"``), and no NaN/inf.
SECTION_CONFIG = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class Expected(str):
    """What a field allows, in words, where its type and bounds do not say it (``Annotated[str, Expected(...)]``)."""


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


#: A list field: YAML lists become tuples, so sections stay hashable and immutable.
Items = Annotated[tuple[T, ...], BeforeValidator(_as_tuple)]
Count = Annotated[int, Field(ge=0)]
PositiveCount = Annotated[int, Field(ge=1)]  # ge=1, not pydantic's PositiveInt (gt=0): messages read ">= 1"


def section(cls: Optional[type] = None, /, *, label: str = "") -> Any:
    """Makes ``cls`` a config section: a frozen pydantic dataclass with :data:`SECTION_CONFIG`.

    A section field of another section takes a mapping (a YAML section). A bad value raises a
    one-line ValueError (see :func:`build`), also when the class is called directly.
    ``label`` marks a section that is also built on its own (``AGVM config``, ``model spec``): it
    starts the errors of a standalone build, and its refused values read ``key=value is invalid: ...``.
    """
    def wrap(cls: type) -> type:
        cls.__get_pydantic_core_schema__ = classmethod(_from_mapping)
        cls = pydantic.dataclasses.dataclass(frozen=True, config=SECTION_CONFIG)(cls)
        cls.__section_label__ = label

        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            try:
                _validate(type(self), args, kwargs, self)
            except ValidationError as error:
                raise ValueError(_explain(error, type(self), label)) from None

        cls.__init__ = __init__
        return cls

    return wrap if cls is None else wrap(cls)


def build(cls: type[T], values: Any, where: str = "", prefix: str = "") -> T:
    """``cls`` from a mapping (a YAML file or section), or a one-line ValueError.

    Args:
        where: what the message starts with (a file name, ``per_agent[1]``); default: the section's label.
        prefix: the dotted key of ``cls`` in its file (``agent.``), put before the keys the message names.
    """
    where = where or getattr(cls, "__section_label__", "")
    if not isinstance(values, Mapping):
        raise ValueError(_join(where, f"expected a mapping, got {values!r}"))
    try:
        return _validate(cls, (), dict(values))
    except ValidationError as error:
        raise ValueError(_explain(error, cls, where, prefix)) from None


def invalid(reason: str, **values: Any) -> PydanticCustomError:
    """The error for a rule of a section's model validator: ``values`` (field -> value) break it.

    The translator names the fields by their dotted keys: ``raise invalid("expected v_min < v_max",
    v_min=..., v_max=...)`` reads ``agent.v_min=5.0, agent.v_max=1.0: expected v_min < v_max``.
    """
    return PydanticCustomError("invalid", "{reason}", {"reason": reason, "values": values})


def reject_unknown_keys(cls: type, values: Mapping[str, Any], where: str, prefix: str = "") -> None:
    """Raises ValueError naming each unknown key (with its dotted ``prefix``) and listing the valid ones."""
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(_unknown_keys(cls, where, [prefix + key for key in unknown]))


def _unknown_keys(cls: type, where: str, keys: list[str]) -> str:
    return _join(where, f"unknown key(s) {keys}; valid keys are {sorted(f.name for f in dataclasses.fields(cls))}")


def _validate(cls: type[T], args: Sequence[Any], kwargs: dict[str, Any], instance: Optional[T] = None) -> T:
    """Runs pydantic's validation of ``cls(*args, **kwargs)``, raising its ValidationError."""
    instance = cls.__new__(cls) if instance is None else instance
    cls.__pydantic_validator__.validate_python(ArgsKwargs(tuple(args), kwargs), self_instance=instance)
    return instance


def _from_mapping(cls: type, source: type, handler: Callable[[Any], Any]) -> Any:
    """Schema hook of a section: a mapping is validated field by field (strict mode takes only instances)."""
    return core_schema.no_info_before_validator_function(
        lambda value: _validate(source, (), dict(value)) if isinstance(value, Mapping) else value, handler(source))


# --- pydantic's errors in one line -------------------------------------------------------------

_UNKNOWN = ("unexpected_keyword_argument", "extra_forbidden")
_MISSING = ("missing_argument", "missing")
#: A value of the right kind that a section refuses (the other errors say the kind is wrong).
_REFUSED = ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "too_short", "too_long",
            "string_too_short", "literal_error", "value_error", "invalid")
#: Wrong kind of value -> the kind expected, said before what the field allows.
_KINDS = {"int_type": "int", "float_type": "float", "string_type": "str"}


@dataclasses.dataclass
class _Place:
    """Where an error is: the section that owns it, the path to that section and the field's type there."""

    owner: type
    path: list[str]
    key: Optional[str] = None
    hint: Any = None
    metadata: list[Any] = dataclasses.field(default_factory=list)


def _explain(error: ValidationError, root: type, where: str = "", prefix: str = "") -> str:
    errors = error.errors(include_url=False)
    for kinds, what in ((_UNKNOWN, "unknown"), (_MISSING, "missing")):
        found = [(e, _locate(root, e["loc"])) for e in errors if e["type"] in kinds]
        if found:
            place = found[0][1]
            dotted = prefix + "".join(f"{part}." for part in place.path)
            keys = [dotted + str(e["loc"][-1]) for e, p in found if p.path == place.path]
            text = (_unknown_keys(place.owner, "", keys) if what == "unknown" else f"missing key(s) {keys}")
            return _join(where, f"{dotted[:-1]}: {text}") if place.path else _join(where or "top level", text)
    first = errors[0]
    return _sentence(first, _locate(root, first["loc"], first["type"] in ("value_error", "invalid")), where, prefix)


def _sentence(error: dict[str, Any], place: _Place, where: str, prefix: str) -> str:
    """One error as ``key=value: expected ...`` (see ``section`` for the ``is invalid`` form)."""
    refused = error["type"] in _REFUSED
    labelled = refused and getattr(place.owner, "__section_label__", "")
    owner_where = prefix + ".".join(place.path) if place.path else where
    if error["type"] == "value_error" and place.key is None:  # a model validator's own sentence
        return _join(owner_where if labelled else where, str(error["ctx"]["error"]))
    if error["type"] == "invalid":
        values, reason = error["ctx"]["values"], error["ctx"]["reason"]
    else:
        values, reason = {place.key: _shown(error["input"], place.hint)}, _reason(error, place)
    if labelled:
        named = ", ".join(f"{key}={value!r}" for key, value in values.items())
        return _join(owner_where, f"{named} is invalid: {reason}")
    dotted = prefix + "".join(f"{part}." for part in place.path)
    named = ", ".join(f"{dotted}{key}={value!r}" for key, value in values.items())
    return _join(where, f"{named}: {reason}")


def _reason(error: dict[str, Any], place: _Place) -> str:
    if error["type"] == "value_error":
        return str(error["ctx"]["error"])
    allowed = _allowed(place.hint, place.metadata)
    kind = _KINDS.get(error["type"])
    if kind and place.hint in (int, float, str):
        plain = _allowed(place.hint, [])
        return f"expected {kind}" + (f" ({allowed})" if allowed != plain else "")
    return f"expected {allowed}"


def _locate(root: type, loc: tuple[Union[int, str], ...], of_section: bool = False) -> _Place:
    """Follows an error's location through sections, fields and list items, skipping union tags.

    ``of_section``: the error is a model validator's, so a location ending at a section field means the section.
    """
    place = _Place(root, [])
    for part in (*loc, None) if of_section else loc:
        if place.key is not None and hasattr(place.hint, "__pydantic_fields__"):  # into a section
            place = _Place(place.hint, [*place.path, place.key])
        fields = getattr(place.owner, "__pydantic_fields__", {}) if place.key is None else {}
        if part in fields:
            place.key = str(part)
            place.hint, place.metadata = _unwrap(fields[part].annotation, list(fields[part].metadata))
        elif isinstance(part, int) and typing.get_origin(place.hint) is tuple:
            place.hint, place.metadata = _unwrap(typing.get_args(place.hint)[0], [])
    return place


def _unwrap(hint: Any, metadata: list[Any]) -> tuple[Any, list[Any]]:
    """``Annotated``/``Optional`` peeled off: the type and its constraints (FieldInfo's flattened)."""
    while True:
        args = typing.get_args(hint)
        if typing.get_origin(hint) is Annotated:
            hint = args[0]
            for item in args[1:]:
                metadata.extend(item.metadata if isinstance(item, FieldInfo) else [item])
        elif typing.get_origin(hint) is Union and type(None) in args and len(args) == 2:
            hint = next(a for a in args if a is not type(None))
        else:
            return hint, metadata


def _allowed(hint: Any, metadata: list[Any]) -> str:
    """What a field allows, in words: its :class:`Expected`, else its type and bounds."""
    said = [m for m in metadata if isinstance(m, Expected)]
    if said:
        return said[0]
    non_empty = any(isinstance(m, annotated_types.MinLen) and m.min_length >= 1 for m in metadata)
    if typing.get_origin(hint) is Literal:
        return f"one of {list(typing.get_args(hint))}"
    if typing.get_origin(hint) is Union:
        return " or ".join(_allowed(*_unwrap(member, [])) for member in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return "a non-empty list" if non_empty else "a list"
    words = {bool: "true or false", int: "an integer", float: "a finite number",
             str: "a non-empty string" if non_empty else "a string"}
    return words.get(hint, "a mapping" if hint is dict or typing.get_origin(hint) is dict
                     or hasattr(hint, "__pydantic_fields__") else "a value") + _bounds(metadata)


def _bounds(metadata: list[Any]) -> str:
    """``" >= 1"``, ``" > 0"`` or ``" in [0, 1)"`` from the annotated-types bounds of a field."""
    low = high = None
    for m in metadata:
        if isinstance(m, (annotated_types.Ge, annotated_types.Gt)):
            low = (m.ge, "[", ">=") if isinstance(m, annotated_types.Ge) else (m.gt, "(", ">")
        elif isinstance(m, (annotated_types.Le, annotated_types.Lt)):
            high = (m.le, "]", "<=") if isinstance(m, annotated_types.Le) else (m.lt, ")", "<")
    if low and high:
        return f" in {low[1]}{_number(low[0])}, {_number(high[0])}{high[1]}"
    bound = low or high
    return f" {bound[2]} {_number(bound[0])}" if bound else ""


def _number(value: Union[int, float]) -> str:
    return format(value, "g") if isinstance(value, float) else str(value)


def _shown(value: Any, hint: Any) -> Any:
    """The value as the field would hold it: ints of float fields as floats, lists as tuples."""
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return tuple(value) if typing.get_origin(hint) is tuple and isinstance(value, list) else value


def _join(where: str, text: str) -> str:
    return f"{where}: {text}" if where else text


# --- YAML and overrides ------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats: ``1e-3`` is a number, not the string YAML 1.1 makes of it."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(source: Union[str, IO[str]]) -> Any:
    """``yaml.safe_load`` that also reads exponent notation without a dot (``1e-3``, ``5E4``) as floats."""
    return yaml.load(source, Loader=_Loader)


def read_yaml_mapping(path: Union[str, os.PathLike], what: str) -> dict[str, Any]:
    """Loads a YAML file that must hold a mapping (an empty file is an empty mapping)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            values = parse_yaml(f) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{what} {path}: not valid YAML ({yaml_problem(error)})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{what} {path}: expected a mapping at the top level")
    return values


def read_config(path: Optional[Union[str, os.PathLike]], overrides: Sequence[str], what: str) -> dict[str, Any]:
    """The mapping of a config file (none: empty) with ``key.sub=value`` command-line overrides applied."""
    values = read_yaml_mapping(path, what) if path is not None else {}
    return apply_overrides(values, parse_overrides(overrides))


def yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML error in one line: the problem and where it is (PyYAML's own message spans several)."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem:
        mark = error.problem_mark
        return f"{error.problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else error.problem
    return " ".join(str(error).split())


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``key.sub=value`` strings as {dotted key: value}, values read as YAML (``1e-3`` is a float)."""
    parsed = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} is not of the form key.sub=value")
        try:
            parsed[key.strip()] = parse_yaml(raw) if raw.strip() else None
        except yaml.YAMLError as error:
            raise ValueError(f"override {item!r}: the value is not valid YAML ({yaml_problem(error)})") from None
    return parsed


def apply_overrides(values: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``values`` with ``overrides`` applied.

    A dotted key sets a nested value, creating the mappings on its way
    (``{"detector_kwargs.rpn_batch_size_per_image": 64}``); a mapping value is merged, recursively,
    into the mapping it replaces (``{"zero_optimization": {"stage": 3}}`` keeps the other ZeRO keys).
    """
    merged = copy.deepcopy(dict(values))
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = merged
        for depth, part in enumerate(parents):
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ValueError(f"override {key!r}: {'.'.join(parents[:depth + 1])} is not a mapping")
            node = node[part]
        node[leaf] = _merge(node.get(leaf), value)
    return merged


def _merge(base: Any, value: Any) -> Any:
    if isinstance(base, Mapping) and isinstance(value, Mapping):
        return {**base, **{key: _merge(base.get(key), inner) for key, inner in value.items()}}
    return copy.deepcopy(value)
