"""Checks on user-supplied text shared by every resource."""

from __future__ import annotations

import re

from mycloud_compute.services.errors import InvalidParameter

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")

# C0 and C1 control characters and DEL. PostgreSQL cannot store NUL at all, and
# the others make names unreadable in terminals and logs.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

# Regular expression character classes (without brackets) for the OpenAPI document:
# the control characters above, and the characters that str.strip() removes, which
# are more than JSON Schema's (ECMA-262) \s and differ from it in \ufeff.
CONTROL_CLASS = r"\x00-\x1f\x7f-\x9f"
WHITESPACE_CLASS = r"\t\n\x0b\x0c\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_CONTROL_EXCEPT_LINE_BREAKS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def is_uuid(value: str) -> bool:
    """True for the hyphenated 8-4-4-4-12 hex form (either case), the only form ids take."""
    # fullmatch, because "$" also matches before a trailing newline, which let
    # "<uuid>\n" through to uuid.UUID() and a 500.
    return _UUID.fullmatch(value) is not None


def reject_control_characters(parameter: str, value: str, *, allow_line_breaks: bool = False) -> None:
    """Raise InvalidParameter when ``value`` contains a control character."""
    pattern = _CONTROL_EXCEPT_LINE_BREAKS if allow_line_breaks else _CONTROL
    if pattern.search(value):
        raise InvalidParameter(parameter, value, f"{parameter} must not contain control characters")
