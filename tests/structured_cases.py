"""Constraints the structured-output tests share: a JSON schema that forces termination (enums,
bounded integers, short strings, short arrays), a regex and a choice."""

from __future__ import annotations

import json
import re

import jsonschema

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "enum": ["ann", "bob", "cy"]},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "address": {
            "type": "object",
            "properties": {
                "zip": {"type": "integer", "minimum": 1000, "maximum": 9999},
                # A pattern, not maxLength: xgrammar's JSON strings admit raw control characters,
                # which json.loads refuses.
                "city": {"type": "string", "pattern": "^[a-z]{1,6}$"},
            },
            "required": ["zip", "city"],
            "additionalProperties": False,
        },
        "tags": {
            "type": "array",
            "items": {"type": "string", "enum": ["x", "y", "z"]},
            "minItems": 1,
            "maxItems": 3,
        },
    },
    "required": ["name", "age", "address", "tags"],
    "additionalProperties": False,
}
SCHEMA_TEXT = json.dumps(SCHEMA)
REGEX = r"(cat|dog)-[0-9]{2,4}"
CHOICES = ("red", "green", "blue sky")
MAX_TOKENS = 120  # the schema's longest output is well below this on the tiny vocabulary


def assert_matches_schema(text: str) -> None:
    jsonschema.validate(json.loads(text), SCHEMA)


def assert_matches_regex(text: str) -> None:
    assert re.fullmatch(REGEX, text), text
