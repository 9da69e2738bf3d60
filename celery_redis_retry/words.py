"""Counts in words for what operators read: ``1 task``, ``2 tasks``, ``unknown tasks``."""

from __future__ import annotations


def counted(number: float | None, noun: str, plural: str | None = None) -> str:
    """``number`` and ``noun``, the noun in the plural unless ``number`` is 1.

    ``None`` (a figure that could not be read) reads ``unknown <plural>``; ``plural``
    is for nouns that do not just take an ``s``. A fraction is shown as short as it
    goes (``1.5 days``), a whole number whole (``1 day``, not ``1.0 days``).
    """
    many = plural or noun + "s"
    if number is None:
        return f"unknown {many}"
    shown = f"{number:g}" if number % 1 else str(int(number))
    return f"{shown} {noun if number == 1 else many}"
