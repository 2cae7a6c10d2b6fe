"""Names that become path components in the store: models, classes, stages, digests, arrays."""

from __future__ import annotations

import re

NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")


def validate_name(value: str, what: str = "name") -> str:
    """Return ``value`` if it is safe as one path component, else raise ValueError naming it."""
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise ValueError(
            f"invalid {what} {value!r}: use 1-100 characters from A-Z a-z 0-9 . _ - "
            "and do not start with '.'"
        )
    return value
