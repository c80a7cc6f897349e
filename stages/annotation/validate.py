"""Checks of generated text: what makes a triplet wrong, whatever words the model chose.

Each check returns the parsed value or raises `Invalid(reason)`. Reasons are short snake_case
names: they become the rejection counters of the annotate stage.

How a model names the two images ("the query image", "Image A", "the first photo", "the left
one") is the prompt's business and never a reason. A reason is something no wording makes
right: empty, refused, leaked, looping, garbled or self-contradicting text ("a blue square instead
of a blue square"), an answer in another language, outside the word bounds, holding a phrase the
domain bans, or an instruction that copies the target's caption or a demonstration (which shows
other images). `Rules` carries what a domain chooses: its language, banned phrases, the prompt.
"""

from __future__ import annotations

import itertools
import re
import string
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated

from pydantic import AfterValidator

# ISO 639-1 code -> the Unicode scripts its letters are written in (the first word of a letter's Unicode name).
LANGUAGES: dict[str, tuple[str, ...]] = {
    **{code: ("LATIN",) for code in "af ca cs cy da de en es et eu fi fr ga gl hr hu id is it lt lv ms nb nl no "
                                    "pl pt ro sk sl sq sv sw tl tr vi".split()},  # fmt: skip
    **{code: ("CYRILLIC",) for code in "be bg kk ky mk mn ru uk".split()},
    "sr": ("CYRILLIC", "LATIN"),
    "el": ("GREEK",),
    **{code: ("ARABIC",) for code in ("ar", "fa", "ur")},
    "he": ("HEBREW",),
    **{code: ("DEVANAGARI",) for code in ("hi", "mr", "ne")},
    "zh": ("CJK",),
    "ja": ("CJK", "HIRAGANA", "KATAKANA"),
    "ko": ("HANGUL", "CJK"),
}

# Frequent function words of the Latin-script languages a script cannot tell apart (a word in two lists is dropped
# from both): an answer whose most frequent ones are another language's is in that language.
_FUNCTION_WORDS = {
    "en": "the and of with is are this that these those its for on at from by which while both same but has have there than "
          "into without where what some other "
          "a as no do in am den son sin plus ma lo su",  # the last words: also English, so never another language's sign
    "de": "der die das und mit ist sind ein eine einer einem einen dem den des auf für von zu im am nicht auch beide beiden "
          "wie aber oder sich gleiche gleichen ohne bei",
    "fr": "le la les et avec est sont un une des du de dans sur pour par au aux ce cette ces qui mais ou même deux sans pas "
          "plus en",
    "es": "el la los las y con es son un una unos unas del de en por para sobre este esta estos que pero mismo misma ambas "
          "ambos sin más",
    "it": "il lo la gli le e con è sono un una uno del della dei nel nella per su questo questa che ma stesso stessa "
          "entrambe senza più",
    "pt": "o a os as e com é são um uma do da dos das no na em por para este esta que mas mesmo mesma ambas sem mais de",
    "nl": "de het een en met is zijn van op voor in dit deze dat die maar ook zelfde beide zonder niet",
}  # fmt: skip
_SHARED = {w for a, b in itertools.combinations(_FUNCTION_WORDS.values(), 2) for w in set(a.split()) & set(b.split())}
FUNCTION_WORDS_OF = {lang: frozenset(ws.split()) - _SHARED for lang, ws in _FUNCTION_WORDS.items()}
MIN_FOREIGN_HITS = 2  # fewer function words of another language than this prove nothing (a name, a borrowed phrase)
# Prose, in any of these languages, is about a third function words (descriptions measured here: 0.31 and up);
# word salad from a broken or untrained model is a tenth or less.
PROSE_WORDS = {lang: frozenset(ws.split()) | (frozenset("to it an or one two only each be was were not they their".split())
                                               if lang == "en" else frozenset()) for lang, ws in _FUNCTION_WORDS.items()}  # fmt: skip
MIN_PROSE_SHARE, MIN_PROSE_WORDS = 0.15, 20

# Han ideographs and kana: scripts written without spaces, where each character counts as a word.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
WORD = re.compile(rf"[{_CJK}]|(?:(?![{_CJK}])[^\W_])+(?:['’](?:(?![{_CJK}])[^\W_])+)*")
TOKEN = re.compile(rf"(?:{WORD.pattern})(?:-(?:{WORD.pattern}))*|[^\w\s]")  # words ("dog-like" is one) and punctuation

# Unmistakable refusals anywhere; softer ones ("I cannot see") only where an answer starts.
REFUSALS = re.compile(r"\b(i'?m sorry|i am sorry|i apologi[sz]e|as an ai\b|as a language model)", re.IGNORECASE)
OPENING_REFUSALS = re.compile(
    r"\b(i cannot|i can'?t (help|assist|provide|see|view|describe)|i'?m (unable|not able) to|i am (unable|not able) to|"
    r"unable to (view|see|process))\b",
    re.IGNORECASE,
)
OPENING = 200  # characters where an answer's opening refusal would stand
# Leaks of the request's format: a demonstration's labels, a chat template's special tokens.
PROMPT_MARKERS = re.compile(r"\b(description|instructions)\s*:|<\|[a-z_]+\|>|\[/?inst\]|</?s>", re.IGNORECASE)
LEAK_RUN = 10  # this many words in a row from the prompt's own text: the answer repeats the prompt
LEADING_LABEL = re.compile(r"^\W*description\W*:\W*", re.IGNORECASE)  # "**Description:** Both ..." keeps its content
ITEM = re.compile(r"^\s*(?:\(?(\d{1,2})\s*[.):]|[-*•])\s+(.*)$")  # "1." "2)" "3:" "(4)" "-" "*" "•"
# Names of either image inside an instruction, which is said by someone holding one image about an unseen one.
ROLE_NAMES = re.compile(
    r"(?i:\b(query|target|source|reference)\s+(image|photo|picture)\b|\bthe\s+(first|second)\s+(image|photo|picture)\b)|"
    r"(?i:\b(image|photo|picture))\s+[AB12]\b"  # "image B", not "picture a red mug"
)

# "A <connective> B" says that A takes B's place: the same thing on both sides contradicts itself.
CONNECTIVES = [c.split() for c in ("instead of", "rather than", "in place of", "as opposed to", "not", "versus", "vs",
                                   "replaced by", "replaced with", "swapped for", "changed to", "changed into", "turned into")]  # fmt: skip
# "replace B with A": the same, B first; each form of the verb -> the words that introduce A.
OPENERS = {
    **dict.fromkeys(("replace", "replaces", "replaced", "replacing"), ("with", "by")),
    **dict.fromkeys(("swap", "swaps", "swapped", "swapping"), ("for", "with")),
    **dict.fromkeys(("change", "changes", "changed", "changing"), ("to", "into")),
    **dict.fromkeys(("turn", "turns", "turned", "turning"), ("into",)),
}
# Words that end a clause (the left side of a connective is read back to one of them, or to punctuation).
CLAUSE_WORDS = frozenset("but while whereas although though yet however so because which that where when".split())
# Words that end a phrase (the right side is read up to one of them; "and" and "or" join the things it lists).
PHRASE_END = CLAUSE_WORDS | frozenset("with in on at for from by near under over behind beside against to into".split())
ARTICLES = frozenset("a an the one some".split())
# Words around a noun phrase, not inside it: a match must start and end next to one (or at the clause's edge),
# so "a toy cat instead of a cat" is no contradiction.
AROUND = PHRASE_END | frozenset("and or of is are was were be it its this these those has have had shows show showing "
                                "features feature featuring includes include including contains containing holds holding "
                                "wears wearing now also only just still".split())  # fmt: skip
AUXILIARIES = frozenset("is are was were be been being has have had gets got get".split())
MEANINGLESS = ARTICLES | AROUND | frozenset("same other another kind sort".split())  # a side made of these alone says nothing
REPEAT_NGRAM, REPEAT_MIN_WORDS, REPEAT_MIN_DISTINCT = 3, 12, 0.5  # a looping answer repeats most of its 3-word runs


class Invalid(ValueError):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Bounds:
    min_words: int
    max_words: int


@dataclass(frozen=True)
class Rules:
    """What a domain chooses about its answers besides word bounds."""

    language: str = "en"  # a key of LANGUAGES: the answers' letters must be mostly in its scripts
    banned: tuple[str, ...] = ()  # phrases no answer may hold (whole words, any case)
    prompt: str = ""  # the request's template: an answer repeating a long run of its own words leaks it

    def __post_init__(self):
        if self.language not in LANGUAGES:
            raise ValueError(f"unknown language {self.language!r}; known: {', '.join(sorted(LANGUAGES))}")


ENGLISH = Rules()


def _known_language(v: str) -> str:
    Rules(language=v)
    return v


def _ordered(v: tuple[int, int]) -> tuple[int, int]:
    if not 0 <= v[0] <= v[1]:
        raise ValueError(f"expected [min, max] with 0 <= min <= max, got {list(v)}")
    return v


# Setting types of the steps that validate answers (caption, annotate): checked when a config loads.
Language = Annotated[str, AfterValidator(_known_language)]  # an ISO 639-1 code validation knows
WordBounds = Annotated[tuple[int, int], AfterValidator(_ordered)]  # [min, max] words


def words(text: str) -> list[str]:
    """Lower-cased words; in Chinese and Japanese each ideograph or kana is one."""
    return WORD.findall(text.lower())


def check_description(text: str, bounds: Bounds, rules: Rules = ENGLISH) -> str:
    return _check_prose(LEADING_LABEL.sub("", " ".join(text.split())), "description", bounds, rules)


CAPTION_LABEL = re.compile(r"^\W*(?:caption|description)\W*:\W*", re.IGNORECASE)  # "Caption: A red ..." keeps its content


def check_caption(text: str, bounds: Bounds, rules: Rules = ENGLISH) -> str:
    """A generated caption: one piece of prose about the image, within `bounds` words, in the rules' language."""
    text = CAPTION_LABEL.sub("", " ".join(text.split())).strip('"')
    if text and _refuses(text):
        raise Invalid("refusal")
    return _check_prose(text, "caption", bounds, rules)


def _check_prose(text: str, what: str, bounds: Bounds, rules: Rules) -> str:
    """One paragraph of `what` (description, caption): present, in the rules' language, within bounds, prose."""
    if not text:
        raise Invalid(f"empty_{what}")
    _check_text(text, rules)
    n = len(words(text))
    if n < bounds.min_words:
        raise Invalid(f"{what}_too_short")
    if n > bounds.max_words:
        raise Invalid(f"{what}_too_long")
    if repetitive(text):
        raise Invalid("repetitive")
    if not reads_as_prose(text, rules.language):
        raise Invalid("gibberish")
    return text


def parse_instructions(
    text: str, n: int, bounds: Bounds, captions: list[str | None] = (), rules: Rules = ENGLISH, demonstrations: list[str] = ()
) -> list[str]:
    """Exactly `n` listed, distinct instructions within word bounds that pass every check, none a caption or a
    demonstration's instruction; a line before the list is a preamble, a paragraph after it a postscript."""
    if _refuses(text):
        raise Invalid("refusal")
    items = list_items(text)
    if len(items) < n:
        raise Invalid("too_few_instructions")
    if len(items) > n:
        raise Invalid("too_many_instructions")
    if any(not it for it in items):
        raise Invalid("empty_instruction")
    if len({" ".join(words(it)) for it in items}) < n:
        raise Invalid("duplicate_instructions")
    caption_words = [set(words(c)) for c in captions if c]
    demo_words = [set(words(d)) for d in demonstrations]
    for it in items:
        _check_text(it, rules)
        if ROLE_NAMES.search(it):
            raise Invalid("instruction_names_query_or_target")
        w = words(it)
        if len(w) < bounds.min_words:
            raise Invalid("instruction_too_short")
        if len(w) > bounds.max_words:
            raise Invalid("instruction_too_long")
        if repetitive(it):
            raise Invalid("repetitive")
        if any(_jaccard(set(w), cw) >= 0.8 for cw in caption_words):
            raise Invalid("instruction_restates_caption")
        if any(_jaccard(set(w), dw) >= 0.8 for dw in demo_words):
            raise Invalid("instruction_copies_demonstration")
    return items


def list_items(text: str) -> list[str]:
    """The items of the first numbered or bulleted list in `text`. An unmarked line right after an item continues it;
    blank lines may separate items; a paragraph after the list is a postscript, not part of the last item."""
    items: list[str] = []
    blank = ended = False
    for line in text.strip().splitlines():
        if not line.strip():
            blank = True
            continue
        m = ITEM.match(line)
        if m and not ended:
            items.append(" ".join(m.group(2).split()).strip(" \"'"))
        elif items and not blank and not ended:
            items[-1] = f"{items[-1]} {' '.join(line.split())}".strip(" \"'")
        elif items:
            ended = True
        blank = False
    return items


def _check_text(text: str, rules: Rules) -> None:
    """What a description and each instruction must both pass."""
    if _refuses(text):
        raise Invalid("refusal")
    if PROMPT_MARKERS.search(text) or (rules.prompt and _repeats_prompt(text, rules.prompt)):
        raise Invalid("prompt_leak")
    if not in_language(text, rules.language):
        raise Invalid("wrong_language")
    if rules.banned and banned_phrase(text, rules.banned):
        raise Invalid("banned_phrase")
    if contradiction(text):
        raise Invalid("self_contradiction")


def _refuses(text: str) -> bool:
    return bool(REFUSALS.search(text) or OPENING_REFUSALS.search(text[:OPENING]))


def in_language(text: str, language: str) -> bool:
    """Whether `text` reads as `language`: at least half of its letters in the language's scripts (names and
    numbers may be foreign), and, among languages that share a script, no other's function words outnumbering its own."""
    scripts = LANGUAGES[language]
    letters = [ch for ch in text if ch.isalpha()]
    if letters and sum(1 for ch in letters if unicodedata.name(ch, "").split(" ", 1)[0] in scripts) * 2 < len(letters):
        return False
    if language not in FUNCTION_WORDS_OF:
        return True
    w = words(text)
    own = sum(1 for t in w if t in FUNCTION_WORDS_OF[language])
    return all(hits < MIN_FOREIGN_HITS or hits <= own
               for lang, fw in FUNCTION_WORDS_OF.items() if lang != language for hits in [sum(1 for t in w if t in fw)])  # fmt: skip


def reads_as_prose(text: str, language: str) -> bool:
    """Whether a paragraph (not a terse instruction) has the function words of its language that prose has."""
    w = words(text)
    if language not in PROSE_WORDS or len(w) < MIN_PROSE_WORDS:
        return True
    return sum(1 for t in w if t in PROSE_WORDS[language]) >= MIN_PROSE_SHARE * len(w)


def banned_phrase(text: str, banned: tuple[str, ...]) -> str | None:
    """The first banned phrase that `text` holds as whole words, any case."""
    padded = f" {' '.join(words(text))} "
    for phrase in banned:
        w = words(phrase)
        if w and f" {' '.join(w)} " in padded:
            return phrase
    return None


def contradiction(text: str) -> str | None:
    """A thing that `text` sets against itself ("a blue square instead of a blue square", "replace the red ball with
    a red ball"), or None. The left side is read back to the start of its clause, the right side up to the end of
    its phrase; a side that lists several things ("two circles and a blue square") contradicts when one of them,
    whole, is on the other side."""
    tokens = TOKEN.findall(text.lower())
    for i, tok in enumerate(tokens):
        for conn in CONNECTIVES:
            if tokens[i : i + len(conn)] == conn:
                hit = _same_thing(_phrase_after(tokens, i + len(conn)), _clause_before(tokens, i))
                if hit:
                    return hit
        if tok in OPENERS:
            old = _phrase_after(tokens, i + 1)
            j = i + 1 + len(old)
            if old and j < len(tokens) and tokens[j] in OPENERS[tok]:
                hit = _same_thing(_phrase_after(tokens, j + 1), old)
                if hit:
                    return hit
    return None


def _clause_before(tokens: list[str], end: int) -> list[str]:
    """The words before `end` back to punctuation or a clause word (commas right before `end` skipped: "red, not red")."""
    while end > 0 and tokens[end - 1] == ",":
        end -= 1
    start = end
    while start > 0 and tokens[start - 1][0].isalnum() and tokens[start - 1] not in CLAUSE_WORDS:
        start -= 1
    return tokens[start:end]


def _phrase_after(tokens: list[str], start: int) -> list[str]:
    end = start
    while end < len(tokens) and tokens[end][0].isalnum() and tokens[end] not in PHRASE_END:
        end += 1
    if end < len(tokens) and tokens[end] in ("and", "or"):  # a list goes on: "a cube and a ball"
        return tokens[start : end + 1] + _phrase_after(tokens, end + 1)
    return tokens[start:end]


def _same_thing(right: list[str], left: list[str]) -> str | None:
    """The thing(s) of `right` when `left` names exactly them (articles aside, in any order): "X and Y instead of Y and X"
    contradicts, "X and Y instead of Y" adds X. The first thing on the left is read back to where its noun phrase starts."""
    while left and left[-1] in AUXILIARIES:  # "the red car is replaced by ...", "the ball is not ..."
        left = left[:-1]
    new, old = _listed(left), _listed(right)
    if not old or len(new) != len(old) or any(all(w in MEANINGLESS for w in _bare(item)) for item in old):
        return None
    head, rest = new[0], sorted(_bare(item) for item in new[1:])
    for i, item in enumerate(old):
        if _ends_with(head, _bare(item)) and rest == sorted(_bare(x) for j, x in enumerate(old) if j != i):
            return " and ".join(" ".join(_bare(x)) for x in old)
    return None


def _listed(tokens: list[str]) -> list[list[str]]:
    items: list[list[str]] = [[]]
    for t in tokens:
        if t in ("and", "or"):
            items.append([])
        else:
            items[-1].append(t)
    return [item for item in items if item]


def _bare(item: list[str]) -> list[str]:
    return [t for t in item if t not in ARTICLES]


def _ends_with(item: list[str], phrase: list[str]) -> bool:
    """Whether `item` ends with `phrase` (articles aside) as a whole noun phrase: "a toy cat" does not end with "cat"."""
    i, k = len(item), 0
    while i > 0 and k < len(phrase):
        i -= 1
        if item[i] not in ARTICLES:
            if item[i] != phrase[len(phrase) - 1 - k]:
                return False
            k += 1
    return k == len(phrase) and (i == 0 or item[i - 1] in ARTICLES or item[i - 1] in AROUND)


def repetitive(text: str) -> bool:
    """Whether `text` loops: most of its 3-word runs occur more than once."""
    w = words(text)
    if len(w) < REPEAT_MIN_WORDS:
        return False
    grams = [tuple(w[i : i + REPEAT_NGRAM]) for i in range(len(w) - REPEAT_NGRAM + 1)]
    return len(set(grams)) < REPEAT_MIN_DISTINCT * len(grams)


def _repeats_prompt(text: str, prompt: str) -> bool:
    answer = words(text)
    runs = _prompt_runs(prompt)
    return any(tuple(answer[i : i + LEAK_RUN]) in runs for i in range(len(answer) - LEAK_RUN + 1))


@lru_cache(maxsize=16)
def _prompt_runs(prompt: str) -> frozenset[tuple[str, ...]]:
    """Every run of LEAK_RUN words inside the template's own text (its {fields} are the request's data, not the prompt)."""
    runs = set()
    for literal, *_ in string.Formatter().parse(prompt):
        w = words(literal)
        runs.update(tuple(w[i : i + LEAK_RUN]) for i in range(len(w) - LEAK_RUN + 1))
    return frozenset(runs)


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a and b else 0.0
