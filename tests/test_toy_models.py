"""The toy describe VLM and instruct LLM: built on a tiny hand-made corpus, reloaded with the Auto
classes, and run batched exactly as the annotate stage runs real models."""

from __future__ import annotations

import io
import json
import random
import re
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from demo import toy_models
from stages.annotation.prompts import Demonstration, describe_text, instruct_text, load_prompt

COLOURS = {"red": (210, 40, 40), "blue": (40, 70, 210), "green": (40, 160, 60), "yellow": (235, 205, 40)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20)}
SHAPES = ("circle", "square")
DEMOS = [
    Demonstration(
        "Both images show a red circle. The target image has a black background instead of a white one.",
        (
            "Show this circle on a black background.",
            "Same red circle but the backdrop is black.",
            "A red circle, black behind it.",
        ),
    )
]


def jpeg(colour: str, shape: str, background: str) -> bytes:
    img = Image.new("RGB", (80, 64), {**COLOURS, **BACKGROUNDS}[background])
    draw = ImageDraw.Draw(img)
    (draw.ellipse if shape == "circle" else draw.rectangle)([20, 12, 60, 52], fill=COLOURS[colour])
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory) -> str:
    """16 captioned JPEGs in one img2dataset-style WebDataset shard."""
    path = tmp_path_factory.mktemp("tiny_corpus") / "00000.tar"
    with tarfile.open(path, "w") as tar:
        for i, (colour, shape, background) in enumerate(
            (c, s, b) for c in COLOURS for s in SHAPES for b in BACKGROUNDS
        ):
            key = f"{i:09d}"
            caption = f"a {colour} {shape} on a {background} background"
            meta = {"key": key, "url": f"http://example.com/{key}.jpg", "caption": caption,
                    "re_caption": f"A simple drawing of one {colour} {shape} against a plain {background} backdrop.",
                    "width": 80, "height": 64}  # fmt: skip
            add(tar, f"{key}.jpg", jpeg(colour, shape, background))
            add(tar, f"{key}.json", json.dumps(meta).encode())
            add(tar, f"{key}.txt", caption.encode())
    return str(path.parent / "*.tar")


@pytest.fixture(scope="module")
def models(tiny_corpus, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("demo_models")
    return {
        "describer": toy_models.build_describer(root / "describer", tiny_corpus, steps=40),
        "instructor": toy_models.build_instructor(root / "instructor", tiny_corpus, steps=60),
    }


def image(colour: str, background: str) -> Image.Image:
    return Image.open(io.BytesIO(jpeg(colour, "circle", background)))


def stops_at(generated: torch.Tensor, eos: int, pad: int) -> list[bool]:
    """Per row: did it emit the end-of-turn token, with only padding after it?"""
    out = []
    for row in generated.tolist():
        if eos not in row:
            out.append(False)
            continue
        assert all(t == pad for t in row[row.index(eos) + 1 :]), "tokens after end-of-turn"
        out.append(True)
    return out


def test_describer_generates_batched_with_two_images_per_prompt(models):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(models["describer"])
    model = AutoModelForImageTextToText.from_pretrained(models["describer"])
    eos, pad = (processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>"))
    assert (model.generation_config.eos_token_id, model.generation_config.pad_token_id) == (eos, pad)

    prompts = [("a red circle on a white background", "a blue circle on a white background", 80),
               ("a yellow circle on a black background", "a yellow square on a white background", 60)]  # fmt: skip
    template = load_prompt("describe-v1")
    content = [
        [{"type": "image"}, {"type": "image"}, {"type": "text", "text": describe_text(template, q, t, n)}]
        for q, t, n in prompts
    ]
    texts = [
        processor.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True, tokenize=False)
        for c in content
    ]
    assert texts[0].endswith("<|im_start|>assistant\n") and texts[0].count("<image>") == 2
    processor.tokenizer.padding_side = "left"
    inputs = processor(
        text=texts,
        images=[
            [image("red", "white"), image("blue", "white")],
            [image("yellow", "black"), image("yellow", "white")],
        ],
        padding=True,
        return_tensors="pt",
    )
    assert inputs["pixel_values"].shape[0] == 4  # two images per prompt
    assert inputs["attention_mask"][:, -1].all()  # left padded
    torch.manual_seed(0)
    out = model.generate(**inputs, max_new_tokens=160, do_sample=True, temperature=0.7, top_p=0.9)
    generated = out[:, inputs["input_ids"].shape[1] :]
    decoded = processor.batch_decode(generated, skip_special_tokens=True)
    assert len(decoded) == 2 and all(d.strip() for d in decoded)
    assert any(stops_at(generated, eos, pad)), decoded
    assert not any("<|im_end|>" in d or "<image>" in d for d in decoded)


def test_instructor_generates_a_numbered_list_batched(models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models["instructor"])
    model = AutoModelForCausalLM.from_pretrained(models["instructor"])
    eos, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert (model.generation_config.eos_token_id, model.generation_config.pad_token_id) == (eos, pad)

    description = ("Both the query image and the target image show a red circle. What is specific to the target "
                   "image is a black background, which does not appear in the query image.")  # fmt: skip
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": instruct_text(load_prompt("instruct-v1"), description, demos, 3)}],
            add_generation_prompt=True, tokenize=False,
        )  # fmt: skip
        for demos in ([], DEMOS)  # different lengths: padding matters
    ]
    tokenizer.padding_side = "left"
    inputs = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    torch.manual_seed(0)
    out = model.generate(**inputs, max_new_tokens=120, do_sample=True, temperature=0.7, top_p=0.9)
    generated = out[:, inputs["input_ids"].shape[1] :]
    decoded = tokenizer.batch_decode(generated, skip_special_tokens=True)
    assert all(stops_at(generated, eos, pad)), decoded
    assert all(re.search(r"^\d\.", d, re.M) for d in decoded), decoded  # numbered lines, if few so far


def test_saved_folders_are_regular_hugging_face_folders(models):
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (models["describer"] / name).is_file(), name
        assert (models["instructor"] / name).is_file(), name
    assert (models["describer"] / "processor_config.json").is_file()
    report = json.loads((models["instructor"] / "demo_training.json").read_text())
    assert report["toy_model"] and report["final_loss"] < report["first_loss"]


def test_tokenizer_keeps_chat_and_vision_tokens_whole(models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models["instructor"])
    for token in toy_models.SPECIAL_TOKENS:
        assert tokenizer.tokenize(token) == [token]
    text = "1. Find a red circle, on blue!\n2. Ünïcode ok."
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"


def test_training_texts_follow_the_formats(tiny_corpus):
    rng = random.Random(0)
    samples = toy_models.read_corpus(tiny_corpus)
    assert len(samples) == 16 and len(samples[0].captions) == 2  # caption and re_caption; the .txt repeats the caption
    for pair in toy_models.mine_pairs(samples, 30, rng):
        description = toy_models.describe_answer(pair, rng.randint(60, 100), rng)
        assert "the query image" in description.lower() and "the target image" in description.lower()
        assert 40 <= len(description.split()) <= 100
        for n in (2, 3, 4, 5):
            lines = toy_models.instruct_answer(pair, n, rng)
            assert len(lines) == len(set(lines)) == n
            assert all(5 <= len(line.split()) <= 30 for line in lines)
            assert not any(re.search(r"query image|target image", line, re.I) for line in lines)


def test_phrases_come_from_the_captions():
    assert [c.text for c in toy_models.chunks("Three red circles on a white background, dim light.")] == [
        "three red circles", "a white background", "dim light",
    ]  # fmt: skip
    assert [c.text for c in toy_models.chunks("two cups of coffee and a model of the space shuttle")] == [
        "two cups of coffee", "a model of the space shuttle",
    ]  # fmt: skip


def test_builds_are_deterministic(tiny_corpus, tmp_path):
    a = toy_models.build_instructor(tmp_path / "a", tiny_corpus, steps=2, seed=3)
    b = toy_models.build_instructor(tmp_path / "b", tiny_corpus, steps=2, seed=3)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
