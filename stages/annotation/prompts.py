"""Prompt templates, the demonstration pool and banned phrases: the project's, or a team's own files.

A prompt is either the name of a packaged template (`stages/prompts/NAME-vN.txt`: editing one
means adding a new file, never changing an old one) or the path of a `.txt` file the user owns.
Either way its name in every annotation's provenance says which text it was: the packaged
name, or the file's name and a digest of its bytes. The rendered prompt is part of the answer
cache key, so an edited file never reuses answers to the old text.
"""

from __future__ import annotations

import hashlib
import json
import random
import string
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

PROMPT_DIR = Path(__file__).resolve().parent.parent / "prompts"
DEMONSTRATIONS_FILE = Path(__file__).resolve().parent.parent / "data" / "demonstrations.jsonl"

WORD_NUM_RANGE = (60, 100)

# The fields each step's template may use; a template must use the required ones.
DESCRIBE_FIELDS = {"query_caption", "target_caption", "query_attributes", "target_attributes", "word_num"}
# Packaged describe prompts that speak of images shown with the request: a text describer, shown none, cannot use them.
VISION_PROMPTS = {"describe-v1"}
INSTRUCT_FIELDS = {"description", "demonstrations", "n"}


@dataclass(frozen=True)
class PromptTemplate:
    name: str  # e.g. "describe-v1", or "describe.txt@0123456789ab" for a user's file
    text: str

    def render(self, **fields: object) -> str:
        return self.text.format(**fields).strip()

    def fields(self) -> set[str]:
        """The {fields} the template uses. Raises ValueError on a malformed one (a lone brace)."""
        return {name for _, name, _, _ in string.Formatter().parse(self.text) if name is not None}


@dataclass(frozen=True)
class Demonstration:
    description: str
    instructions: tuple[str, ...]

    def render(self) -> str:
        lines = "\n".join(f"{i}. {s}" for i, s in enumerate(self.instructions, 1))
        return f"Description: {self.description}\nInstructions:\n{lines}"


def available_prompts() -> list[str]:
    return sorted(p.stem for p in PROMPT_DIR.glob("*.txt"))


def is_file(prompt: str) -> bool:
    """Whether a prompt setting names a file (a path, or a name with a suffix) rather than a packaged template."""
    return "/" in prompt or "\\" in prompt or bool(Path(prompt).suffix)


def load_prompt(prompt: str) -> PromptTemplate:
    """A packaged template by name, or a template file by path."""
    if is_file(prompt):
        return _prompt_file(*_stamped(prompt, "prompt file"))
    return _packaged_prompt(prompt)


@lru_cache(maxsize=None)
def _packaged_prompt(name: str) -> PromptTemplate:
    path = PROMPT_DIR / f"{name}.txt"
    if not path.is_file():
        raise ValueError(f"unknown prompt {name!r}; available: {', '.join(available_prompts())}, or the path of a .txt file")
    return PromptTemplate(name, path.read_text(encoding="utf-8"))


@lru_cache(maxsize=64)
def _prompt_file(path: Path, stamp: tuple) -> PromptTemplate:
    data = path.read_bytes()
    return PromptTemplate(f"{path.name}@{hashlib.sha256(data).hexdigest()[:12]}", _utf8(data, path))


def _stamped(path: str, what: str) -> tuple[Path, tuple]:
    """A file and its size and modification time: cached reads key on them, so an edited file is read again."""
    file = Path(path).expanduser()
    try:
        st = file.stat()
    except OSError:
        st = None
    if st is None or not file.is_file():
        raise ValueError(f"{what} not found: {file}")
    return file, (st.st_size, st.st_mtime_ns)


def _utf8(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None


def check_template(template: PromptTemplate, allowed: set[str], required: set[str] = frozenset()) -> None:
    """Raises ValueError naming a field the step does not fill, or a required one the template lacks."""
    try:
        used = template.fields()
    except ValueError as e:
        raise ValueError(f"{template.name}: not a valid template ({e}); write a literal brace as {{{{ or }}}}") from None
    if unknown := sorted(used - allowed):
        raise ValueError(f"{template.name}: unknown field(s) {', '.join('{' + f + '}' for f in unknown)}; "
                         f"this step fills {', '.join('{' + f + '}' for f in sorted(allowed))} "
                         "(write a literal brace as {{ or }})")  # fmt: skip
    if missing := sorted(required - used):
        raise ValueError(f"{template.name}: needs the field(s) {', '.join('{' + f + '}' for f in missing)}")


def load_demonstrations(path: str | None = None) -> tuple[Demonstration, ...]:
    """The pool: one JSON object per line, {"description": str, "instructions": [str, ...]}; default: the project's 50."""
    return _demonstrations(*_stamped(str(path or DEMONSTRATIONS_FILE), "demonstrations file"))


@lru_cache(maxsize=16)
def _demonstrations(file: Path, stamp: tuple) -> tuple[Demonstration, ...]:
    demos = []
    for n, line in enumerate(_utf8(file.read_bytes(), file).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}:{n}: not JSON ({e.msg})") from None
        instructions = row.get("instructions") if isinstance(row, dict) else None
        if not isinstance(row, dict) or not isinstance(row.get("description"), str) or not row["description"].strip() \
                or not isinstance(instructions, list) or not instructions \
                or not all(isinstance(s, str) and s.strip() for s in instructions):  # fmt: skip
            raise ValueError(f'{file}:{n}: a demonstration is {{"description": "...", "instructions": ["...", ...]}}')
        demos.append(Demonstration(row["description"], tuple(instructions)))
    return tuple(demos)


def load_phrases(path: str) -> tuple[str, ...]:
    """Phrases, one per line; blank lines and lines starting with # are skipped."""
    return _phrases(*_stamped(path, "phrases file"))


@lru_cache(maxsize=16)
def _phrases(file: Path, stamp: tuple) -> tuple[str, ...]:
    lines = (line.strip() for line in _utf8(file.read_bytes(), file).splitlines())
    return tuple(line for line in lines if line and not line.startswith("#"))


def files_digest(paths: list[str]) -> str:
    """One digest of the bytes of the given files: part of the annotate stage's fingerprint, so an edited file reruns it."""
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).expanduser().read_bytes())
    return h.hexdigest()


def draw_word_num(rng: random.Random) -> int:
    return rng.randint(*WORD_NUM_RANGE)


def describe_text(template: PromptTemplate, query_caption: str, target_caption: str, word_num: int,
                  query_attributes: str = "", target_attributes: str = "") -> str:  # fmt: skip
    """The text of a describe request; a vision describer's backend puts the query and target images before it."""
    return template.render(
        query_caption=query_caption or "(none)", target_caption=target_caption or "(none)", word_num=word_num,
        query_attributes=query_attributes or "(none)", target_attributes=target_attributes or "(none)",
    )  # fmt: skip


def attributes_text(attributes: object) -> str:
    """An image's attributes (nested JSON values, as a corpus keeps them) as one line a model reads: "key: value" parts
    joined by "; ", nested objects as "key value" pairs, lists joined by " and "; empty values left out."""

    def value(v: object) -> str:
        if isinstance(v, dict):
            return ", ".join(f"{k} {t}" for k, x in v.items() if (t := value(x)))
        if isinstance(v, (list, tuple)):
            return " and ".join(t for x in v if (t := value(x)))
        return "" if v is None else str(v)

    if not isinstance(attributes, dict):
        return value(attributes)
    return "; ".join(f"{k}: {t}" for k, v in attributes.items() if (t := value(v)))


def instruct_text(
    template: PromptTemplate, description: str, demonstrations: list[Demonstration], n: int
) -> str:
    demos = "\n\n".join(d.render() for d in demonstrations)
    return template.render(description=description.strip(), demonstrations=demos, n=n)


def draw_demonstrations(pool: tuple[Demonstration, ...], k: int, rng: random.Random) -> list[Demonstration]:
    return rng.sample(list(pool), min(k, len(pool)))
