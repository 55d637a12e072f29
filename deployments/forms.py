"""The run forms of the deployments: Prefect's parameter schemas, made to say what crv accepts.

Prefect derives a deployment's `parameter_openapi_schema` from the flow's signature; that gives
`appliance: str` and `parameters: dict[str, str]`, which a form renders as a free text field and
a JSON box. Here the generated schema is completed from the catalog and the pools (pure data in,
JSON Schema out; nothing here imports Prefect):

- `appliance` and `pool` become enums: the UI offers a choice, the API refuses anything else;
- `parameters` and `counts` get a form field per parameter and per node group of the catalog's
  appliances, each described (the appliance, the type, the bounds, the default);
- one `if appliance == X then ...` rule per appliance checks the chosen appliance's parameters
  (the text must read as the declared type, an enum one of its values, no unknown key) and its
  counts (within each group's `scale` bounds);
- every form (`bounded`) takes no parameter the flow does not have (`shell: rm -rf /` is
  refused, not left for the flow to stumble on), no text without a length bound and no map
  without a key bound, so an oversized value is refused by name at the door. (Prefect refuses
  a run whose parameters are over 512 KiB in all, HTTP 422, before any schema is read.)

With `enforce_parameter_schema` the Prefect server checks a run's parameters against this schema
when the run is created (the UI's form asks it too, and shows the answer under the field): bad
input is refused at once, HTTP 409 `Validation failed for field 'parameters.workers'. Failure
reason: ...`, and no flow run exists. What a schema cannot say (an integer's bounds inside a
text value, the total node count) the flow checks first thing, before anything is provisioned.
The schema checks requests; it does not bind whoever has the API's credentials: they may ask
for a run without it (`enforce_parameter_schema: false` in the request, or on the deployment),
and then the flow's own checks are what stop a bad run before any node.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crv.appliance.loader import APPLIANCE_FILE, Appliance, default_search_path, load_appliance
from crv.appliance.spec import NAME_PATTERN, Parameter
from crv.base.errors import CrvError

log = logging.getLogger(__name__)

Schema = dict[str, Any]

# `--set` text the loader reads as each type (crv.appliance.parameters._from_text), as JSON Schema
# patterns that both Python's re and the browser's RegExp read, kept short: the UI shows them
# in its error message. (The loader still checks the rest: bounds, 18 digits at most.)
INTEGER_TEXT = r"^[+-]?[0-9]+$"
NUMBER_TEXT = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"
BOOLEAN_TEXT = ["true", "false"]
NO_CONTROL_CHARACTERS = r"^[^\x00-\x1f\x7f-\x9f]*$"
INTEGER_TEXT_MAX = 19  # a sign and 18 digits, what the loader reads
NUMBER_TEXT_MAX = 64
# the bounds `bounded` gives a field that has none of its own (a parameter a flow gains later)
TEXT_MAX = 1024
KEYS_MAX = 256  # as many parameters or node groups as an appliance may declare
ITEMS_MAX = 256


@dataclass(frozen=True)
class CatalogEntry:
    """An appliance the forms offer: `ref` is what the flow's `appliance` accepts (the
    directory name on the search path), `appliance` it loaded with its defaults."""

    ref: str
    appliance: Appliance


def catalog(search_path: Sequence[Path] | None = None) -> dict[str, CatalogEntry]:
    """Every appliance on the search path (`$CRV_APPLIANCE_PATH`, then the built-in catalog),
    by directory name; the first one of a name wins, as `crv.appliance.locate` picks it. One
    that does not load with its defaults is left out of the forms (and logged)."""
    paths = list(search_path) if search_path is not None else default_search_path()
    found: dict[str, CatalogEntry] = {}
    for base in paths:
        if not base.is_dir():
            continue
        for directory in sorted(base.iterdir()):
            ref = directory.name
            if ref in found or not (directory / APPLIANCE_FILE).is_file():
                continue
            try:
                appliance = load_appliance(directory, search_path=paths)
            except CrvError as exc:
                log.warning("appliance %s left out of the run forms: %s", directory, exc)
                continue
            found[ref] = CatalogEntry(ref, appliance)
    return found


# -- one appliance --------------------------------------------------------------------------


def _text(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def describe_parameter(p: Parameter, default: object = None) -> str:
    """`integer 1..1000, default 3: Number of web servers` (`default`: the resolved value, which
    an including appliance may have bound)."""
    what: str = p.type
    if p.enum is not None:
        what += " (one of " + ", ".join(_text(v) for v in p.enum) + ")"
    if p.minimum is not None or p.maximum is not None:
        low = "" if p.minimum is None else _text(p.minimum)
        high = "" if p.maximum is None else _text(p.maximum)
        what += f" {low}..{high}"
    default = p.default if default is None else default
    if default is not None:
        what += f", default {_text(default)}"
    text = p.description.strip().rstrip(".")
    return f"{what}: {text}" if text else what


def parameter_value_schema(p: Parameter) -> Schema:
    """The JSON Schema of one parameter's value as the flow takes it: text that reads as the
    declared type."""
    if p.enum is not None:
        return {"type": "string", "enum": [_text(v) for v in p.enum]}
    if p.type == "integer":
        return {"type": "string", "pattern": INTEGER_TEXT, "maxLength": INTEGER_TEXT_MAX}
    if p.type == "number":
        return {"type": "string", "pattern": NUMBER_TEXT, "maxLength": NUMBER_TEXT_MAX}
    if p.type == "boolean":
        return {"type": "string", "enum": BOOLEAN_TEXT}
    return {"type": "string", "maxLength": p.max_length, "pattern": NO_CONTROL_CHARACTERS}


def count_schema(appliance: Appliance, group: str) -> Schema:
    g = appliance.groups[group]
    if not g.scalable:
        return {"type": "integer", "const": g.count}
    return {"type": "integer", "minimum": g.scale_min, "maximum": g.scale_max}


def describe_group(appliance: Appliance, group: str) -> str:
    g = appliance.groups[group]
    roles = ", ".join(g.roles)
    if not g.scalable:
        return f"{g.count} (fixed), roles {roles}"
    return f"{g.scale_min}..{g.scale_max}, default {g.count}, roles {roles}"


def appliance_rule(ref: str, appliance: Appliance) -> Schema:
    """`if appliance == ref then` its parameters and counts are checked."""
    return {
        "if": {"properties": {"appliance": {"const": ref}}, "required": ["appliance"]},
        "then": {
            "properties": {
                "parameters": {
                    "type": ["object", "null"],
                    "properties": {
                        name: parameter_value_schema(p)
                        for name, p in appliance.parameter_specs.items()
                    },
                    "additionalProperties": False,
                },
                "counts": {
                    "type": ["object", "null"],
                    "properties": {g: count_schema(appliance, g) for g in appliance.groups},
                    "additionalProperties": False,
                },
                "pools": {
                    "type": ["object", "null"],
                    "propertyNames": {"enum": list(appliance.groups)},
                },
            }
        },
    }


def parameter_fields(appliance: Appliance) -> Schema:
    """The form's fields for an appliance's parameters: text, described; a choice where the
    parameter has one. (The exact checks are in `appliance_rule`.)"""
    fields: Schema = {}
    for name, p in appliance.parameter_specs.items():
        field: Schema = {
            "type": "string",
            "title": name,
            "description": describe_parameter(p, appliance.parameters.get(name)),
        }
        if p.enum is not None or p.type == "boolean":
            field["enum"] = parameter_value_schema(p)["enum"]
        fields[name] = field
    return fields


def group_fields(appliance: Appliance) -> Schema:
    return {
        g: {"description": f"roles {', '.join(a.roles)}" + (f", pool {a.pool}" if a.pool else "")}
        for g, a in appliance.groups.items()
    }


def count_fields(appliance: Appliance) -> Schema:
    return {
        g: {
            "type": "integer",
            "minimum": 0,
            "title": g,
            "description": describe_group(appliance, g),
        }
        for g in appliance.groups
    }


# -- the three forms ------------------------------------------------------------------------

TUNING = {
    "boot_timeout": "Seconds for a node to boot and enrol.",
    "recipe_timeout": "Seconds a role's recipe may run.",
    "retries": "Retries per step (temporary errors only).",
}


def _describe(props: Schema, descriptions: Mapping[str, str]) -> None:
    for key, text in descriptions.items():
        if key in props:  # a flow may drop a parameter; the form follows
            props[key]["description"] = text


def union_fields(per_appliance: Mapping[str, Schema]) -> Schema:
    """One form field per name across the catalog, its description saying which appliance
    uses it and how. (One set of fields per appliance would be nicer to read, but the UI picks
    the set from the keys a value has, and appliances share names such as `workers`: the form
    would jump to another appliance's set while one types.)"""
    merged: Schema = {}
    for ref, fields in per_appliance.items():
        for name, field in fields.items():
            line = f"{ref}: {field['description']}"
            if name not in merged:
                merged[name] = {**field, "description": line}
                continue
            known = merged[name]
            known["description"] += f"; {line}"
            if known.get("enum") != field.get("enum"):
                known.pop("enum", None)
    return merged


def _nullable_fields(base: Schema, fields: Schema, description: str) -> None:
    """Give `base` (Prefect's `anyOf: [object, null]` of a dict parameter) its fields, a JSON
    box and none (the defaults). They shape the form; what is accepted is `appliance_rule`'s
    to say. (A value no option matched would be refused as `not valid under any of the given
    schemas`, without naming the key, so the JSON box takes any object and leaves it to the
    rule to name the key. No value needs more keys than there are fields: `maxProperties`
    refuses a map of 10,000 keys as `has too many properties` before anything else reads it.)"""
    base.pop("type", None)
    base["anyOf"] = [
        {"type": "object", "title": "set", "properties": fields},
        {"type": "object", "title": "JSON"},
        {"type": "null", "title": "defaults"},
    ]
    base["maxProperties"] = len(fields)
    base["description"] = description


def appliance_table(entries: Mapping[str, CatalogEntry]) -> str:
    """The catalog as a Markdown table (the deployment's description in the UI)."""
    lines = ["| appliance | parameters | node groups (counts) |", "|---|---|---|"]
    for ref, e in entries.items():
        a = e.appliance
        params = "<br>".join(
            f"`{n}`: {describe_parameter(p, a.parameters.get(n))}"
            for n, p in a.parameter_specs.items()
        )
        groups = "<br>".join(f"`{g}`: {describe_group(a, g)}" for g in a.groups)
        title = f"**{ref}**" + (f": {a.description}" if a.description else "")
        lines.append(f"| {_cell(title)} | {_cell(params) or '-'} | {_cell(groups)} |")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def deploy_form(
    generated: Schema, entries: Mapping[str, CatalogEntry], pools: Iterable[str]
) -> Schema:
    """The `deploy-appliance` form from Prefect's generated schema."""
    schema = copy.deepcopy(generated)
    props: Schema = schema["properties"]
    described = (
        f"{ref} ({e.appliance.description.rstrip('.')})" if e.appliance.description else ref
        for ref, e in entries.items()
    )
    # each field only if the flow still has it: a changed signature loses a description, it
    # does not stop the deployments from being served
    if "appliance" in props:
        props["appliance"].update(
            {
                "enum": list(entries),
                "description": "The appliance, from the catalog: " + "; ".join(described),
            }
        )
    pools = list(pools)
    if "pool" in props:
        _pool_field(props["pool"], pools)
    if "pools" in props:
        _nullable_fields(
            props["pools"],
            {
                g: {"type": "string", "title": g, "enum": pools, **field}
                for g, field in union_fields(
                    {ref: group_fields(e.appliance) for ref, e in entries.items()}
                ).items()
            },
            "The pool of a node group, where it is not `pool` (like `crv deploy --pool-for "
            "GROUP=POOL`; default: the group's pool in the appliance, else `pool`). Only the "
            "chosen appliance's groups.",
        )
    if "name" in props:
        for option in props["name"].get("anyOf", []):
            if option.get("type") == "string":
                option.update({"pattern": NAME_PATTERN, "maxLength": 63})
        props["name"]["description"] = (
            "Cluster name (default: the appliance's name); lower case letters, digits and '-'."
        )
    if "parameters" in props:
        _nullable_fields(
            props["parameters"],
            union_fields({ref: parameter_fields(e.appliance) for ref, e in entries.items()}),
            "The appliance's parameters, as text (like `crv deploy --set KEY=VALUE`); leave "
            "empty what keeps its default. Only the chosen appliance's parameters are accepted.",
        )
    if "counts" in props:
        _nullable_fields(
            props["counts"],
            union_fields({ref: count_fields(e.appliance) for ref, e in entries.items()}),
            "Nodes per group, within each group's scale bounds (default: the counts the "
            "parameters give; a resized cluster keeps its own). Only the chosen appliance's "
            "groups.",
        )
    _describe(props, TUNING)
    schema["allOf"] = [appliance_rule(ref, e.appliance) for ref, e in entries.items()]
    if "pools" in props:  # whatever the appliance, a group's pool is a known one
        schema["allOf"].append(
            {
                "properties": {
                    "pools": {"type": ["object", "null"], "additionalProperties": {"enum": pools}}
                }
            }
        )
    return bounded(schema)


def scale_form(generated: Schema, entries: Mapping[str, CatalogEntry]) -> Schema:
    """The `scale-role` form: the cluster, the group and its new count, described."""
    schema = copy.deepcopy(generated)
    props: Schema = schema["properties"]
    groups = "; ".join(
        f"{ref}: " + ", ".join(f"{g} {describe_group(e.appliance, g)}" for g in e.appliance.groups)
        for ref, e in entries.items()
    )
    _name_field(props, "name", "Cluster name (see `crv list`).")
    _name_field(props, "group", f"Node group to resize. The catalog's groups: {groups}")
    _describe(
        props,
        {
            **TUNING,
            "count": "Nodes the group should have, within its scale bounds (newest nodes go "
            "first).",
        },
    )
    return bounded(schema)


def destroy_form(generated: Schema, pools: Iterable[str]) -> Schema:
    schema = copy.deepcopy(generated)
    props: Schema = schema["properties"]
    _name_field(props, "name", "Cluster name (see `crv list`).")
    if "pool" in props:
        _pool_field(props["pool"], pools)
    return bounded(schema)


def repair_form(generated: Schema) -> Schema:
    schema = copy.deepcopy(generated)
    props: Schema = schema["properties"]
    _name_field(props, "name", "Cluster name (see `crv list`).")
    _describe(props, TUNING)
    return bounded(schema)


def _name_field(props: Schema, key: str, description: str) -> None:
    if key in props:
        props[key].update({"pattern": NAME_PATTERN, "maxLength": 63, "description": description})


def _pool_field(field: Schema, pools: Iterable[str]) -> None:
    known = list(pools)
    field.update({"enum": known, "description": "Resource pool: " + ", ".join(known)})


def bounded(schema: Schema) -> Schema:
    """`schema` (a whole form) closed: no parameter beyond the flow's (`additionalProperties`),
    and each field, or each option of a field that may be one of several (`anyOf`), bounded
    where neither has a bound of its own: text by `maxLength` (an enum's by its longest value),
    maps by `maxProperties`, lists by `maxItems`. Prefect's server checks all of these (JSON
    Schema draft 2020-12, `prefect.utilities.schema_tools.validation`)."""
    schema["additionalProperties"] = False
    for field in schema.get("properties", {}).values():
        for option in [field, *field.get("anyOf", [])]:
            _bound(option, field)
    return schema


_BOUNDS = {"string": "maxLength", "object": "maxProperties", "array": "maxItems"}


def _bound(option: Schema, field: Schema) -> None:
    types = option.get("type", [])
    for kind in [types] if isinstance(types, str) else types:
        keyword = _BOUNDS.get(kind)
        if keyword is None or keyword in option or keyword in field:
            continue
        if kind == "string":
            enum = option.get("enum") or field.get("enum")
            option[keyword] = max(len(str(v)) for v in enum) if enum else TEXT_MAX
        else:
            option[keyword] = KEYS_MAX if kind == "object" else ITEMS_MAX
