"""Counts in messages: "1 batch", "2 batches", never "1 batches"."""

from __future__ import annotations


def counted(n: int, singular: str, plural: str = "") -> str:
    """`n` and the noun agreeing with it: counted(1, "row") -> "1 row", counted(3, "batch") -> "3 batches".

    plural: for irregular nouns; by default "es" after s, x, z, ch and sh, else "s"."""
    if n == 1:
        return f"1 {singular}"
    if not plural:
        plural = singular + ("es" if singular.endswith(("s", "x", "z", "ch", "sh")) else "s")
    return f"{n} {plural}"
