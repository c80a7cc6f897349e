"""Strict checks of generated text. Each check returns the parsed value or raises `Invalid(reason)`.

Reasons are short snake_case names: they become the rejection counters of the annotate stage.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

REFUSALS = re.compile(
    r"\b(i'?m sorry|i am sorry|i apologi[sz]e|as an ai|as a language model|i cannot|i can'?t (help|assist|provide|see|view)|unable to (view|see|process))\b",
    re.IGNORECASE,
)
PROMPT_MARKERS = re.compile(r"(^|\n)\s*(description|instructions)\s*:|refer to them as|answer with a numbered list|<\|?im_(start|end)", re.IGNORECASE)
NUMBERED = re.compile(r"^\s*(\d{1,2})\s*[.):]\s*(.*)$")
ROLE_NAMES = re.compile(r"\b(query|target)\s+image\b", re.IGNORECASE)
WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?", re.IGNORECASE)


class Invalid(ValueError):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Bounds:
    min_words: int
    max_words: int


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def check_description(text: str, bounds: Bounds) -> str:
    text = " ".join(text.split())
    if not text:
        raise Invalid("empty_description")
    if REFUSALS.search(text):
        raise Invalid("refusal")
    if PROMPT_MARKERS.search(text):
        raise Invalid("prompt_leak")
    low = text.lower()
    names_both = ("query" in low and "target" in low) or ("first image" in low and "second image" in low)
    if not names_both:
        raise Invalid("description_does_not_name_both_images")
    n = len(words(text))
    if n < bounds.min_words:
        raise Invalid("description_too_short")
    if n > bounds.max_words:
        raise Invalid("description_too_long")
    return text


def parse_instructions(text: str, n: int, bounds: Bounds, captions: list[str | None] = ()) -> list[str]:
    """Exactly `n` numbered, distinct instructions within word bounds, none a refusal, a leak or a caption."""
    if REFUSALS.search(text):
        raise Invalid("refusal")
    items: list[str] = []
    for line in text.strip().splitlines():
        m = NUMBERED.match(line)
        if m:
            items.append(" ".join(m.group(2).split()).strip(" \"'"))
        elif items and line.strip():  # a wrapped continuation of the previous item
            items[-1] = f"{items[-1]} {' '.join(line.split())}".strip()
    if len(items) < n:
        raise Invalid("too_few_instructions")
    if len(items) > n:
        raise Invalid("too_many_instructions")
    if any(not it for it in items):
        raise Invalid("empty_instruction")
    if len({" ".join(words(it)) for it in items}) < n:
        raise Invalid("duplicate_instructions")
    caption_words = [set(words(c)) for c in captions if c]
    for it in items:
        if PROMPT_MARKERS.search(it):
            raise Invalid("prompt_leak")
        if ROLE_NAMES.search(it):
            raise Invalid("instruction_names_query_or_target")
        w = words(it)
        if len(w) < bounds.min_words:
            raise Invalid("instruction_too_short")
        if len(w) > bounds.max_words:
            raise Invalid("instruction_too_long")
        if any(_jaccard(set(w), cw) >= 0.8 for cw in caption_words):
            raise Invalid("instruction_restates_caption")
    return items


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a and b else 0.0
