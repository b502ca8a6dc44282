"""Sizes as operators write them: 2G, 1M, 512K, 4096."""

from __future__ import annotations

from support.errors import PermanentError

_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_size(text: str) -> int:
    """Bytes in `text` (binary units: 1M = 1048576). A bad size is a one-line error."""
    value = text.strip().upper()
    for suffix in ("IB", "B"):
        if value.endswith(suffix) and len(value) > len(suffix):
            value = value[: -len(suffix)]
            break
    number, unit = value, ""
    if value and value[-1] in _UNITS:
        number, unit = value[:-1], value[-1]
    try:
        size = int(float(number) * _UNITS[unit])
    except ValueError:
        raise PermanentError(f"invalid size {text!r}: use e.g. 2G, 1M, 512K") from None
    if size <= 0:
        raise PermanentError(f"invalid size {text!r}: must be positive")
    return size
