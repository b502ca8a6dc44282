"""Sizes as operators write them: 2G, 1M, 512K, 4096."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

from support.errors import PermanentError

SQLITE_INTEGER_MAX = 2**63 - 1
# Far past any limit a caller checks (the smallest of which names itself), short of an
# integer too large to make.
PARSE_CEILING = 2**80
_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_size(text: str) -> int:
    """Bytes in `text` (binary units: 1M = 1048576), exact for whole numbers. A bad size is
    a one-line error; so is an absurd one (past PARSE_CEILING). The callers check what they
    parse against their own limits, which they name (devices/limits.py)."""
    value = text.strip().upper()
    for suffix in ("IB", "B"):
        if value.endswith(suffix) and len(value) > len(suffix):
            value = value[: -len(suffix)]
            break
    number, unit = value, ""
    if value and value[-1] in _UNITS:
        number, unit = value[:-1], value[-1]
    try:
        amount = Decimal(number) * _UNITS[unit]
    except (InvalidOperation, ValueError):
        raise PermanentError(f"invalid size {text!r}: use e.g. 2G, 1M, 512K") from None
    if not amount.is_finite():
        raise PermanentError(f"invalid size {text!r}: use e.g. 2G, 1M, 512K")
    if amount > PARSE_CEILING:  # before int(): 1e999999 would be a million-digit integer
        raise PermanentError(f"invalid size {text!r}: larger than {SQLITE_INTEGER_MAX} bytes (8 EiB), "
                             "SQLite's largest INTEGER")
    size = int(amount)
    if size <= 0:
        raise PermanentError(f"invalid size {text!r}: must be positive")
    return size
