"""Jinja2 for appliance templates: sandboxed, strict, expressions only.

Appliance templates are small expressions (`{{ workers * 2 }}`, `{{ self.url }}/health`) written
by whoever shares an appliance, so they are treated as untrusted: no statements (loops could
spin for ever), no attribute access to Python internals (the sandbox), no unbounded `**` or
sequence repetition (memory), and an undefined name is an error rather than an empty string.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from jinja2 import StrictUndefined, meta, nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment

MAX_OUTPUT = 8192


class _Sandbox(SandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int | float) and abs(right) > 64:
            raise SecurityError("exponent above 64")
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                repeats = isinstance(seq, str | list | tuple) and isinstance(times, int)
                if repeats and len(seq) * times > MAX_OUTPUT:
                    raise SecurityError("repetition longer than 8192")
        return super().call_binop(context, operator, left, right)


_ENV = _Sandbox(undefined=StrictUndefined, autoescape=False)


def parse(template: str) -> nodes.Template:
    """Parse an expressions-only template; ValueError with a one-line reason if it is not."""
    if "{%" in template or "{#" in template:
        raise ValueError("templates may only use {{ expressions }}, not {% statements %}")
    try:
        return _ENV.parse(template)
    except Exception as exc:  # TemplateSyntaxError and friends: reported, never raised raw
        raise ValueError(f"invalid template: {exc}") from None


_SELF = "crv_self_"


def _rename_self(template: str) -> str:
    """Jinja reserves the name `self` (the template object), but verify templates use it for
    the role's own attributes, as the appliance format says: the name token is renamed."""
    out, prev = [], ""
    for _, kind, value in _ENV.lex(template):
        if kind == "name" and value == "self" and prev != ".":
            value = _SELF
        out.append(value)
        if kind != "whitespace":
            prev = value
    return "".join(out)


def render(template: str, variables: Mapping[str, Any]) -> str:
    parse(template)
    if "self" in variables:
        variables = {_SELF if k == "self" else k: v for k, v in variables.items()}
        template_source = _rename_self(template)
    else:
        template_source = template
    try:
        out = _ENV.from_string(template_source).render(variables)
    except Exception as exc:  # undefined names, sandbox refusals, type and arithmetic errors
        raise ValueError(f"template {template!r} failed: {exc}") from None
    if len(out) > MAX_OUTPUT:
        raise ValueError(f"template {template!r} renders to more than {MAX_OUTPUT} characters")
    return out


def attributes_used(tree: nodes.Template, variable: str) -> set[str]:
    """The `variable.<attr>` names a template reads, so they can be checked before a run."""
    return {
        node.attr
        for node in tree.find_all(nodes.Getattr)
        if isinstance(node.node, nodes.Name) and node.node.name == variable
    }


def undeclared(tree: nodes.Template, allowed: Iterable[str]) -> set[str]:
    return set(meta.find_undeclared_variables(tree)) - set(allowed)
