"""Byte sizes a user writes: '24GiB', '512MiB', '1.5e9'."""

from __future__ import annotations

import math

from gl_ray.errors import UserError

UNITS = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}


def parse_size(text: str, what: str = "--memory-budget") -> int:
    """'24GiB', '512MiB', '1.5e9' -> bytes (`what`: the option or key, for the error)."""
    t = text.strip().upper()
    number, mult = t, 1
    for u, m in UNITS.items():
        if t.endswith(u):
            number, mult = t[: -len(u)], m
            break
    try:
        size = float(number) * mult
    except ValueError:
        size = math.nan
    if not math.isfinite(size) or size < 0:  # inf, nan, -1GiB
        raise UserError(f"{what} {text!r}: expected bytes or a size like 8GiB")
    return int(size)
