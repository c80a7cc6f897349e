"""Versioned prompt templates and the demonstration pool.

Prompts are text files in `stages/prompts/NAME-vN.txt`; the version is part of every
annotation's provenance and of the annotation cache key, so editing a prompt means adding
a new file, never changing an old one.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

PROMPT_DIR = Path(__file__).resolve().parent.parent / "prompts"
DEMONSTRATIONS_FILE = Path(__file__).resolve().parent.parent / "data" / "demonstrations.jsonl"

WORD_NUM_RANGE = (60, 100)


@dataclass(frozen=True)
class PromptTemplate:
    name: str  # e.g. "describe-v1"
    text: str

    def render(self, **fields: object) -> str:
        return self.text.format(**fields).strip()


@dataclass(frozen=True)
class Demonstration:
    description: str
    instructions: tuple[str, ...]

    def render(self) -> str:
        lines = "\n".join(f"{i}. {s}" for i, s in enumerate(self.instructions, 1))
        return f"Description: {self.description}\nInstructions:\n{lines}"


def available_prompts() -> list[str]:
    return sorted(p.stem for p in PROMPT_DIR.glob("*.txt"))


@lru_cache(maxsize=None)
def load_prompt(name: str) -> PromptTemplate:
    path = PROMPT_DIR / f"{name}.txt"
    if not path.is_file():
        raise ValueError(f"unknown prompt {name!r}; available: {', '.join(available_prompts())}")
    return PromptTemplate(name, path.read_text(encoding="utf-8"))


@lru_cache(maxsize=None)
def load_demonstrations(path: str | None = None) -> tuple[Demonstration, ...]:
    file = Path(path) if path else DEMONSTRATIONS_FILE
    demos = []
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not row.get("description") or not row.get("instructions"):
            raise ValueError(f"{file}:{n}: a demonstration needs a description and instructions")
        demos.append(Demonstration(row["description"], tuple(row["instructions"])))
    return tuple(demos)


def draw_word_num(rng: random.Random) -> int:
    return rng.randint(*WORD_NUM_RANGE)


def describe_text(template: PromptTemplate, query_caption: str, target_caption: str, word_num: int) -> str:
    """The text part of a describe request; the backend puts the query and target images before it."""
    return template.render(
        query_caption=query_caption or "(none)", target_caption=target_caption or "(none)", word_num=word_num
    )


def instruct_text(
    template: PromptTemplate, description: str, demonstrations: list[Demonstration], n: int
) -> str:
    demos = "\n\n".join(d.render() for d in demonstrations)
    return template.render(description=description.strip(), demonstrations=demos, n=n)


def draw_demonstrations(pool: tuple[Demonstration, ...], k: int, rng: random.Random) -> list[Demonstration]:
    return rng.sample(list(pool), min(k, len(pool)))
