"""Counts and lists in words, for the lines people read: `1 round`, `3 rounds`, `runs 3 and 4`."""

from __future__ import annotations


def plural(count: int, noun: str, plural_form: str | None = None) -> str:
    """`1 round`, `3 rounds`, `0 enterprises`: a count with its noun in the right number."""
    return f"{count} {noun if count == 1 else (plural_form or noun + 's')}"


def run_list(ids: list[int]) -> str:
    """`run 3`, `runs 3 and 4`, `runs 3, 4 and 7`."""
    if len(ids) == 1:
        return f"run {ids[0]}"
    return f"runs {', '.join(map(str, ids[:-1]))} and {ids[-1]}"
