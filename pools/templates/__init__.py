"""The pools' templates (`pools/templates/*.j2`) and the one Jinja environment that renders
them: StrictUndefined (a missing value is an error, never an empty string), trailing newlines
kept, and autoescape by kind - `*.xml.j2` (libvirt) is XML-escaped, values and attributes
alike; anything else (the iPXE script, the dnsmasq configuration) is not, and its caller
checks every value instead."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2

DIRECTORY = Path(__file__).resolve().parent

ENVIRONMENT = jinja2.Environment(
    loader=jinja2.FileSystemLoader(DIRECTORY),
    autoescape=jinja2.select_autoescape(enabled_extensions=("xml.j2",), default=False),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
)


def render(template: str, **values: Any) -> str:
    """`pools/templates/<template>`, strictly rendered."""
    return ENVIRONMENT.get_template(template).render(**values)
