"""The checks every generated description and instruction list must pass, and the demonstration pool."""

from __future__ import annotations

import pytest

from stages.annotation import prompts
from stages.annotation.validate import Bounds, Invalid, check_description, parse_instructions

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
    assert reason(check_description, "A red circle and a blue circle, side by side in a row.", Bounds(5, 100)) == "description_does_not_name_both_images"
    assert reason(check_description, DESC, Bounds(50, 100)) == "description_too_short"
    assert reason(check_description, DESC, Bounds(5, 10)) == "description_too_long"
    assert reason(check_description, "As an AI, I cannot see the query image or the target image.", Bounds(1, 100)) == "refusal"
    assert reason(check_description, DESC + " Refer to them as the query image and the target image.", Bounds(1, 100)) == "prompt_leak"


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
