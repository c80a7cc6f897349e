"""The checks every generated description and instruction list must pass, and the demonstration pool."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from stages.annotate import AnnotateSettings
from stages.annotation import prompts
from stages.annotation.validate import Bounds, Invalid, Rules, check_description, contradiction, parse_instructions, words

B = Bounds(4, 30)
DESC = (
    "Both the query image and the target image show a red circle on a plain background. "
    "The target image differs: the circle is blue and there are three of them, arranged in a row."
)


def reason(fn, *args) -> str:
    with pytest.raises(Invalid) as e:
        fn(*args)
    return e.value.reason


def test_a_good_answer_parses():
    text = "1. Show three of these in blue, lined up.\n2) Find the same shape repeated, blue not red.\n3: blue circles in a row"
    assert parse_instructions(text, 3, B) == [
        "Show three of these in blue, lined up.",
        "Find the same shape repeated, blue not red.",
        "blue circles in a row",
    ]


def test_wrapped_lines_join_the_item_before():
    text = "1. Show three of these in blue,\n   lined up in a row.\n2. Find the same shape in blue.\n3. blue circles side by side"
    assert parse_instructions(text, 3, B)[0] == "Show three of these in blue, lined up in a row."


@pytest.mark.parametrize(
    "text, why",
    [
        ("1. Show three blue circles please.\n2. Find blue circles in a row.", "too_few_instructions"),
        ("1. a b c d\n2. e f g h\n3. i j k l\n4. m n o p", "too_many_instructions"),
        ("1. Show three blue circles please.\n2. show THREE blue circles, please!\n3. Find a row of blue ones.", "duplicate_instructions"),
        ("1. Show blue.\n2. Find blue circles in a row.\n3. Blue circles lined up here.", "instruction_too_short"),
        ("1. " + "word " * 31 + "\n2. Find blue circles in a row.\n3. Blue circles lined up here.", "instruction_too_long"),
        ("I'm sorry, but I cannot help with that request.", "refusal"),
        ("1. Like the query image but with blue circles.\n2. Find blue circles in a row.\n3. Blue circles lined up here.", "instruction_names_query_or_target"),
        ("1. Description: blue circles in a row\n2. Find blue circles in a row.\n3. Blue circles lined up here.", "prompt_leak"),
    ],
)
def test_bad_instruction_lists_are_rejected(text, why):
    assert reason(parse_instructions, text, 3, B) == why


def test_an_instruction_that_restates_the_caption_is_rejected():
    caption = "three blue circles in a row on a white background"
    text = "1. three blue circles in a row on a white background\n2. Find blue circles in a row.\n3. Blue circles lined up here."
    assert reason(parse_instructions, text, 3, B, [caption]) == "instruction_restates_caption"


def test_description_checks():
    assert check_description("  " + DESC + "\n", Bounds(10, 100)) == DESC
    assert reason(check_description, "", Bounds(10, 100)) == "empty_description"
    # how the two images are named is the prompt's business, not a reason to lose the pair
    assert check_description("A red circle and a blue circle, side by side in a row.", Bounds(5, 100))
    assert reason(check_description, DESC, Bounds(50, 100)) == "description_too_short"
    assert reason(check_description, DESC, Bounds(5, 10)) == "description_too_long"
    assert reason(check_description, "As an AI, I cannot see the query image or the target image.", Bounds(1, 100)) == "refusal"
    describe = Rules(prompt=prompts.load_prompt("describe-v1").text)
    leaked = DESC + " Refer to them as the query image and the target image."
    assert reason(check_description, leaked, Bounds(1, 100), describe) == "prompt_leak"
    assert check_description(leaked, Bounds(1, 100))  # without the prompt, nothing says it is one


def test_demonstration_pool_is_fifty_good_examples():
    pool = prompts.load_demonstrations()
    assert len(pool) == 50
    assert len({d.description for d in pool}) == 50
    for d in pool:
        assert check_description(d.description, Bounds(40, 120))
        assert parse_instructions(d.render().split("Instructions:\n", 1)[1], len(d.instructions), Bounds(4, 30)) == list(d.instructions)


def test_prompts_render_with_their_fields():
    text = prompts.describe_text(prompts.load_prompt("describe-v1"), "a cat", "", 70)
    assert '"a cat"' in text and '"(none)"' in text and "about 70 words" in text
    demos = list(prompts.load_demonstrations()[:2])
    inst = prompts.instruct_text(prompts.load_prompt("instruct-v1"), "the description", demos, 4)
    assert "exactly 4 lines" in inst and inst.endswith("Description: the description\nInstructions:")
    assert inst.count("Description:") == 3
    with pytest.raises(ValueError, match="unknown prompt"):
        prompts.load_prompt("describe-v99")


# --- the hand-written answer set: good answers in many phrasings, and bad ones --------------------

ANSWERS = Path(__file__).parent / "data" / "answers.jsonl"


def judge(row: dict) -> str | None:
    """The reason the product's validation (default bounds and prompts) gives `row`, or None when it passes."""
    defaults = AnnotateSettings()
    template = prompts.load_prompt(defaults.describe_prompt if row["kind"] == "description" else defaults.instruct_prompt)
    rules = Rules(language=row.get("language", "en"), banned=tuple(row.get("banned", ())), prompt=template.text)
    try:
        if row["kind"] == "description":
            check_description(row["text"], Bounds(*defaults.description_words), rules)
        else:
            parse_instructions(row["text"], row["n"], Bounds(*defaults.instruction_words), row.get("captions", ()), rules,
                               row.get("demonstrations", ()))  # fmt: skip
    except Invalid as e:
        return e.reason
    return None


def test_validation_rejects_no_good_answer_and_every_bad_one_for_its_reason():
    rows = [json.loads(line) for line in ANSWERS.read_text(encoding="utf-8").splitlines() if line.strip()]
    good = [r for r in rows if r["reject"] is None]
    bad = [r for r in rows if r["reject"] is not None]
    assert len(good) >= 50 and len(bad) >= 30 and {r["kind"] for r in good} == {"description", "instructions"}
    false_rejects = [(judge(r), r["why"]) for r in good if judge(r) is not None]
    false_accepts = [r["why"] for r in bad if judge(r) is None]
    wrong_reason = [(r["reject"], judge(r), r["why"]) for r in bad if judge(r) not in (None, r["reject"])]
    print(f"\nanswer set: {len(good)} good, {len(bad)} bad; false rejects {len(false_rejects)}/{len(good)} "
          f"({len(false_rejects) / len(good):.1%}), false accepts {len(false_accepts)}/{len(bad)} ({len(false_accepts) / len(bad):.1%})")
    assert not false_rejects
    assert not false_accepts
    assert not wrong_reason
    assert {r["reject"] for r in bad} >= {"refusal", "prompt_leak", "self_contradiction", "wrong_language", "banned_phrase",
                                         "repetitive", "gibberish", "too_few_instructions", "instruction_copies_demonstration"}  # fmt: skip


@pytest.mark.parametrize("text, same", [
    ("a blue square instead of a blue square", "blue square"),
    ("featuring two red circles rather than two red circles?", "two red circles"),
    ("Replace a red ball with a red ball.", "red ball"),
    ("the red car is replaced by a red car", "red car"),
    ("It is red, not red", "red"),
    ("with a cube and a ball instead of a ball and a cube", "ball and cube"),
    ("a toy cat instead of a cat", None),  # a modifier makes it another thing
    ("a cube and a ball instead of a ball", None),  # adds the cube
    ("Both show a dog, the target has a cat instead of a dog", None),  # the comma ends the clause
    ("a dog rather than a dog-like robot", None),
    ("same breed, not the same dog", None),
    ("change the red wine to a white wine", None),
])  # fmt: skip
def test_self_contradiction(text, same):
    assert contradiction(text) == same


def test_words_of_scripts_without_spaces_are_characters():
    assert words("Two cats, 3 dogs and a café") == ["two", "cats", "3", "dogs", "and", "a", "café"]
    assert words("橘色的猫 and a ball") == ["橘", "色", "的", "猫", "and", "a", "ball"]
    with pytest.raises(ValueError, match="unknown language 'xx'"):
        Rules(language="xx")


# --- prompts, demonstrations and phrases from a team's own files -------------------------------------


def test_a_prompt_file_is_named_by_its_digest_and_reread_when_edited(tmp_path):
    f = tmp_path / "describe.txt"
    f.write_text("Compare the two product shots ({query_caption} / {target_caption}) in {word_num} words.")
    first = prompts.load_prompt(str(f))
    assert first.name.startswith("describe.txt@") and first.fields() == {"query_caption", "target_caption", "word_num"}
    f.write_text("Say how the second product differs, in about {word_num} words.")
    os.utime(f, ns=(0, 10**18))  # a new modification time, as an edit gives
    second = prompts.load_prompt(str(f))
    assert second.text.startswith("Say how") and second.name != first.name
    with pytest.raises(ValueError, match="prompt file not found"):
        prompts.load_prompt(str(tmp_path / "nope.txt"))


@pytest.mark.parametrize("text, field, error", [
    ("Describe {query_caption} vs {colour}.", "describe_prompt", r"unknown field\(s\) \{colour\}"),
    ('Answer as JSON: {"a": 1}', "describe_prompt", r"write a literal brace as \{\{ or \}\}"),
    ("Compare {query_caption with braces", "describe_prompt", "not a valid template"),
    ("Write {n} instructions.", "instruct_prompt", r"needs the field\(s\) \{description\}"),
    ("Write {n} instructions for: {description}", "instruct_prompt", "demonstrations would never be shown"),
])  # fmt: skip
def test_a_bad_template_is_a_settings_error(tmp_path, text, field, error):
    f = tmp_path / "prompt.txt"
    f.write_text(text)
    with pytest.raises(ValueError, match=error):
        AnnotateSettings(**{field: str(f)})


def test_demonstration_and_phrase_files(tmp_path):
    pool = tmp_path / "demos.jsonl"
    pool.write_text(json.dumps({"description": "Two mugs.", "instructions": ["a mug in red", "red mug"]}) + "\n\n")
    assert prompts.load_demonstrations(str(pool)) == (prompts.Demonstration("Two mugs.", ("a mug in red", "red mug")),)
    pool.write_text('{"description": "Two mugs.", "instructions": "a mug in red"}\n')
    os.utime(pool, ns=(0, 10**18))
    with pytest.raises(ValueError, match=r"demos.jsonl:1: a demonstration is"):
        AnnotateSettings(demonstrations_file=str(pool))
    phrases = tmp_path / "banned.txt"
    phrases.write_text("# brand names\nAcme\n\nstock photo\n")
    assert prompts.load_phrases(str(phrases)) == ("Acme", "stock photo")
    assert AnnotateSettings(banned_phrases_file=str(phrases)).rules(prompts.load_prompt("describe-v1")).banned == ("Acme", "stock photo")
