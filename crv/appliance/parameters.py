"""Typed appliance parameters: declarations, `--set` text, include bindings, bounds.

A value is checked against its declared type without coercion when it comes from YAML (so
`default: "3"` for an integer is an error, not 3), and converted from text when it comes from
the command line or a rendered template, where everything is text.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from crv.appliance import spec
from crv.appliance.spec import CONTROL_RE, ParamValue
from crv.base.errors import SpecError, brief

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _typed(p: spec.Parameter, value: ParamValue) -> ParamValue:
    """Check a YAML value against the declared type, without coercion (`"3"` is not 3)."""
    ok = {
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, int | float) and not isinstance(value, bool),
        "boolean": isinstance(value, bool),
        "string": isinstance(value, str),
    }[p.type]
    if not ok:
        raise ValueError(f"{brief(value)} is not of type {p.type}")
    return value


def _from_text(p: spec.Parameter, text: str) -> ParamValue:
    """Coerce command-line or rendered text to the declared type."""
    t = text.strip()
    if p.type == "integer":
        if not re.fullmatch(r"[+-]?\d{1,18}", t):
            raise ValueError(f"{brief(text)} is not an integer")
        return int(t)
    if p.type == "number":
        try:
            number = float(t)
        except ValueError:
            raise ValueError(f"{brief(text)} is not a number") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise ValueError(f"{brief(text)} is not a finite number")
        return number
    if p.type == "boolean":
        if t.lower() in _TRUE:
            return True
        if t.lower() in _FALSE:
            return False
        raise ValueError(f"{brief(text)} is not a boolean (true/false)")
    return text


def _out_of_bounds(p: spec.Parameter, value: ParamValue) -> str | None:
    if p.enum is not None and value not in p.enum:
        return f"{brief(value)} is not one of {', '.join(map(repr, p.enum))}"
    if isinstance(value, str):
        if len(value) > p.max_length:
            return f"is longer than max_length {p.max_length}"
        if CONTROL_RE.search(value):
            return "contains control characters"
    elif not isinstance(value, bool):
        if p.minimum is not None and value < p.minimum:
            return f"{value} is below the minimum {p.minimum}"
        if p.maximum is not None and value > p.maximum:
            return f"{value} is above the maximum {p.maximum}"
    return None


def _check_declaration(source: str, name: str, p: spec.Parameter) -> None:
    at = f"parameters.{name}"
    numeric = p.type in ("integer", "number")
    if not numeric and (p.minimum is not None or p.maximum is not None):
        raise SpecError(source, at, f"minimum/maximum apply to numbers, not {p.type}")
    if p.minimum is not None and p.maximum is not None and p.minimum > p.maximum:
        raise SpecError(source, f"{at}.minimum", f"{p.minimum} is above maximum {p.maximum}")
    for i, choice in enumerate(p.enum or ()):
        try:
            _typed(p, choice)
        except ValueError as exc:
            raise SpecError(source, f"{at}.enum[{i}]", str(exc)) from None
    if p.default is not None:
        try:
            _typed(p, p.default)
        except ValueError as exc:
            raise SpecError(source, f"{at}.default", str(exc)) from None
        problem = _out_of_bounds(p, p.default)
        if problem:
            raise SpecError(source, f"{at}.default", problem)


@dataclass(frozen=True)
class Binding:
    """Values an including appliance passes down, and where it wrote them."""

    values: Mapping[str, ParamValue] = field(default_factory=dict)
    source: str = ""
    field: str = ""
    namespace: str = ""  # prefix of this scope's names in the top-level namespace, e.g. "db-"


def resolve_parameters(
    source: str, s: spec.ApplianceSpec, binding: Binding, overrides: Mapping[str, str]
) -> dict[str, ParamValue]:
    """Values for one appliance's parameters: --set, else the include binding, else default."""
    for bound_name in binding.values:
        if bound_name not in s.parameters:
            raise SpecError(
                binding.source,
                f"{binding.field}.parameters.{bound_name}",
                f"{s.name} has no parameter {bound_name!r}",
            )
    values: dict[str, ParamValue] = {}
    for name, p in s.parameters.items():
        _check_declaration(source, name, p)
        key = binding.namespace + name
        where: tuple[str, str]
        try:
            if name in overrides:
                where = ("--set", key)
                value = _from_text(p, overrides[name])
            elif name in binding.values:
                where = (binding.source, f"{binding.field}.parameters.{name}")
                bound = binding.values[name]
                value = _from_text(p, bound) if isinstance(bound, str) else _typed(p, bound)
            elif p.default is not None:
                where = (source, f"parameters.{name}.default")
                value = p.default
            else:
                raise SpecError(
                    source, f"parameters.{name}", f"has no default: give it with --set {key}=VALUE"
                )
        except ValueError as exc:
            raise SpecError(*where, str(exc)) from None
        problem = _out_of_bounds(p, value)
        if problem:
            raise SpecError(*where, problem)
        values[name] = value
    return values


def template_variables(params: Mapping[str, ParamValue]) -> dict[str, Any]:
    """Bare names for `{{ workers }}`, and `params` for hyphenated ones."""
    return {**params, "params": dict(params)}
