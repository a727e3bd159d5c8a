"""Check a JSON report against fusemycells/report.schema.json, with messages that name the key and where to
document it (jsonschema: a test dependency, never in the image)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from fusemycells.report import SCHEMA_FILE, UNIT_SUFFIXES

SCHEMA: dict[str, Any] = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
SCHEMA_NAME = "fusemycells/report.schema.json"


def schema_pointer(target: Any, node: Any = SCHEMA, path: str = "#") -> str | None:
    """The JSON pointer of the sub-schema ``target`` (the very object) within the schema, or None."""
    if node is target:
        return path
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        found = schema_pointer(target, child, f"{path}/{key}")
        if found is not None:
            return found
    return None


def resolve(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema``'s local ``$ref`` target (itself when it has none)."""
    ref = schema.get("$ref")
    if not ref:
        return schema
    node: Any = SCHEMA
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def documented_keys(schema: dict[str, Any]) -> tuple[set[str], list[str]]:
    """(property names, property-name patterns) an object schema documents, its ``$ref`` target's included."""
    names: set[str] = set()
    patterns: list[str] = []
    for part in (schema, resolve(schema)):
        names |= set(part.get("properties", {}))
        patterns += list(part.get("patternProperties", {}))
    return names, patterns


def explain(error: ValidationError) -> list[str]:
    """One line per problem: an undocumented key names itself and the schema object to add it to."""
    where = error.json_path
    if error.validator in ("additionalProperties", "unevaluatedProperties") and isinstance(error.instance, dict):
        names, patterns = documented_keys(error.schema)
        extra = [k for k in error.instance if k not in names and not any(re.search(p, k) for p in patterns)]
        home = resolve(error.schema) if error.validator == "unevaluatedProperties" else error.schema
        pointer = schema_pointer(home) or "/".join(map(str, error.absolute_schema_path))
        return [
            f"{where}: undocumented key {key!r}: add it to {SCHEMA_NAME} at {pointer}/properties "
            "with a type and a description" for key in extra
        ] or [f"{where}: {error.message}"]
    return [f"{where}: {error.message} (schema {'/'.join(map(str, error.absolute_schema_path))})"]


def report_problems(report: dict[str, Any]) -> list[str]:
    """What in ``report`` the schema does not allow (empty: it validates)."""
    validator = Draft202012Validator(SCHEMA)
    errors = sorted(validator.iter_errors(report), key=lambda e: [str(p) for p in e.absolute_path])
    return [line for error in errors for line in explain(error)]


def numeric_leaves(value: Any, path: str = "") -> Iterator[str]:
    """Paths (``files[].shape``: dots between keys, ``[]`` for list items) of the numbers in a report."""
    if isinstance(value, dict):
        for key, child in value.items():
            yield from numeric_leaves(child, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for child in value:
            yield from numeric_leaves(child, f"{path}[]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield path


def key_names(path: str) -> list[str]:
    """The key names along a leaf path (``files[].seconds.read`` → files, seconds, read)."""
    return [part.removesuffix("[]") for part in path.split(".")]


def prefixes(path: str) -> Iterator[str]:
    """``a.b[].c``, ``a.b[]``, ``a.b``, ``a``: the paths a units entry may name for this leaf."""
    parts = path.split(".")
    for n in range(len(parts), 0, -1):
        head = ".".join(parts[:n])
        yield head
        if head.endswith("[]"):
            yield head.removesuffix("[]")


def numbers_without_units(report: dict[str, Any]) -> list[str]:
    """Numeric leaves whose unit neither a key's ending (``_s``, ``_mib``, ...) nor the report's ``units`` names."""
    keys = report.get("units", {}).get("keys", {})
    missing = []
    for path in dict.fromkeys(numeric_leaves({k: v for k, v in report.items() if k != "units"})):
        if any(name.endswith(tuple(UNIT_SUFFIXES)) for name in key_names(path)):
            continue
        if not any(p in keys for p in prefixes(path)):
            missing.append(path)
    return missing


def assert_valid_report(report: dict[str, Any]) -> None:
    """The report validates against the schema and every number in it has a unit."""
    problems = report_problems(report)
    assert not problems, "report does not match " + SCHEMA_NAME + ":\n" + "\n".join(problems)
    missing = numbers_without_units(report)
    assert not missing, (
        "numbers without a unit (end the key with one of "
        + ", ".join(UNIT_SUFFIXES)
        + " or add the path to fusemycells/report.py CASE_UNITS / RUN_UNITS / BATCH_UNITS):\n"
        + "\n".join(missing)
    )
