"""Tiny toy models for the offline demo: a describe VLM and an instruct LLM built from config objects.

No real VLM or LLM installs offline, so the demo trains two very small models for a couple of
minutes on templated text derived from the demo corpus's captions. They are toy models, not
capable ones: what they guarantee is well-formed output (a paragraph naming "the query image"
and "the target image"; a numbered list of n instructions) produced through the same
transformers code path as real models -- `AutoProcessor` + `AutoModelForImageTextToText` with a
chat template and two images per prompt, `AutoTokenizer` + `AutoModelForCausalLM` -- each
saved as a regular Hugging Face folder and stopping at an end-of-turn token.

The describer is a LLaVA-architecture model (tiny CLIP vision tower + tiny Qwen2 text model).
Qwen2-VL's processor cannot be loaded by `AutoProcessor` without torchvision (it always loads
the torchvision-only video processor), and torchvision is not part of this project.
"""

from __future__ import annotations

import glob
import io
import json
import math
import random
import re
import shutil
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from stages.annotation.prompts import (
    DEMONSTRATIONS_FILE,
    Demonstration,
    describe_text,
    draw_demonstrations,
    draw_word_num,
    instruct_text,
    load_demonstrations,
    load_prompt,
)

DESCRIBE_PROMPT = "describe-v1"
INSTRUCT_PROMPT = "instruct-v1"
CAPTION_PROMPT = "caption-v1"
IMAGE_SIZE = 64  # pixels per side after the processor's resize + crop
PATCH_SIZE = 16  # (64 / 16)^2 = 16 tokens per image
MAX_LEN = 1536  # longest training sequence, in tokens (5 demonstrations fit)

END_OF_TEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = [
    END_OF_TEXT, IM_START, IM_END,
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    IMAGE_TOKEN,
]  # fmt: skip

# ChatML, as Qwen models use; each image item becomes one <image> placeholder the processor expands.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><image><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# ---------------------------------------------------------------- corpus


@dataclass
class CaptionedImage:
    key: str
    captions: tuple[str, ...]  # caption and re_caption, whichever are present
    image: Image.Image


def read_corpus(corpus: str | list[str]) -> list[CaptionedImage]:
    """All captioned images of WebDataset shards (img2dataset layout; a folder means its *.tar), in a stable order."""
    patterns = [corpus] if isinstance(corpus, str) else list(corpus)
    patterns = [str(Path(p) / "*.tar") if Path(p).is_dir() else str(p) for p in patterns]
    paths = sorted({p for pattern in patterns for p in (glob.glob(pattern) or [pattern])})
    samples = [s for path in paths for s in _read_tar(path)]
    if not samples:
        raise ValueError(f"no captioned images in {corpus!r}")
    return samples


def _read_tar(path: str) -> list[CaptionedImage]:
    members: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for info in tar:
            if info.isfile() and "." in Path(info.name).name:
                key, ext = info.name.split("/")[-1].split(".", 1)
                members.setdefault(key, {})[ext.lower()] = tar.extractfile(info).read()
    out = []
    for key, files in sorted(members.items()):
        image = next((files[e] for e in ("jpg", "jpeg", "png", "webp") if e in files), None)
        try:
            captions = _captions(files)
            if image is not None and captions:
                out.append(CaptionedImage(key, captions, _small_image(image)))
        except (ValueError, OSError):  # bad json or undecodable image: a toy model can do without it
            continue
    return out


def _captions(files: dict[str, bytes]) -> tuple[str, ...]:
    meta = json.loads(files["json"]) if "json" in files else {}
    found = [meta.get("caption"), meta.get("re_caption")]
    if "txt" in files:
        found.append(files["txt"].decode("utf-8", "replace"))
    return tuple(dict.fromkeys(c.strip() for c in found if isinstance(c, str) and c.strip()))


def _small_image(data: bytes) -> Image.Image:
    """Decoded and shrunk once: the processor resizes to 64 px anyway, this just keeps training fast."""
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (IMAGE_SIZE * 2, IMAGE_SIZE * 2))
    img = img.convert("RGB")
    scale = IMAGE_SIZE * 2 / min(img.size)
    if scale < 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
    return img


# ---------------------------------------------------------------- caption pairs and target texts

DETERMINERS = {"a", "an", "the", "some"}
JOINERS = DETERMINERS | {"of"}  # may sit inside a phrase: "a cup of coffee"
SEPARATORS = set(
    "this that these those its it their his her on in at to with and or by for from into onto over under "
    "above below near beside behind between against along across around through toward towards is are was "
    "were be being has have while as up down out off there here if like which all every everything overall "
    "photo photograph picture image shot view query target shows showing contains features set placed laid "
    "arranged lined clustered spread gathered scattered standing sitting fades leaves looks look almost".split()
)
GENERIC = set(
    "background backdrop lighting light style scene colors colours color colour total objects object "
    "one two three four five six seven eight nine ten close side left right top bottom middle simple plain".split()
)  # a phrase of only these words says nothing about an image
MAX_PHRASE_WORDS = 6


@dataclass(frozen=True)
class Chunk:
    text: str  # e.g. "two cups of coffee"
    words: frozenset[str]  # its content words


def chunks(caption: str) -> list[Chunk]:
    """Noun-phrase-like pieces of a caption, split at punctuation and function words:
    "three red circles on a white background, dim light" -> three red circles | a white background | dim light."""
    out, segment = [], []
    for token in re.findall(r"[a-z0-9]+(?:['-][a-z0-9]+)*|[^\sa-z0-9]", caption.lower()) + ["."]:
        if token in SEPARATORS or not token[0].isalnum():
            out += _phrase(segment)
            segment = []
        else:
            segment.append(token)
    return out


def _phrase(tokens: list[str]) -> list[Chunk]:
    while tokens and tokens[-1] in JOINERS:  # "a cup of" -> "a cup"
        tokens = tokens[:-1]
    while len(tokens) > 1 and tokens[0] in JOINERS and tokens[1] in JOINERS:  # "of the moon" -> "the moon"
        tokens = tokens[1:]
    if tokens and tokens[0] == "of":
        tokens = tokens[1:]
    words = frozenset(t for t in tokens if t not in JOINERS)
    if not words or words <= GENERIC or len(words) > MAX_PHRASE_WORDS:
        return []
    return [Chunk(" ".join(tokens), words)]


def content_words(caption: str) -> set[str]:
    return {w for c in chunks(caption) for w in c.words} - GENERIC


@dataclass
class Pair:
    query: CaptionedImage
    target: CaptionedImage
    query_caption: str
    target_caption: str
    shared: list[str] = field(default_factory=list)  # phrases both captions have
    specific: list[str] = field(default_factory=list)  # phrases only the target caption has
    missing: list[str] = field(default_factory=list)  # phrases only the query caption has
    query_summary: str = ""  # the query caption's first phrases
    target_summary: str = ""


def make_pair(query: CaptionedImage, target: CaptionedImage, rng: random.Random) -> Pair | None:
    """A pair whose captions share a phrase and where the target adds one; None if these two don't."""
    if query.key == target.key:
        return None
    qcap, tcap = rng.choice(query.captions), rng.choice(target.captions)
    qchunks, tchunks = chunks(qcap), chunks(tcap)
    qwords, twords = {w for c in qchunks for w in c.words}, {w for c in tchunks for w in c.words}
    shared = _objects_first([c for c in tchunks if c.words <= qwords])
    specific = _objects_first([c for c in tchunks if not c.words <= qwords])
    if not shared or not specific:
        return None
    missing = [c.text for c in qchunks if not c.words <= twords]
    summaries = join([c.text for c in qchunks], 3), join([c.text for c in tchunks], 3)
    return Pair(query, target, qcap, tcap, shared, specific, missing, *summaries)


def _objects_first(found: list[Chunk]) -> list[str]:
    """Multi-word phrases ("two red motorcycles") before lone words ("yellow"), else in caption order."""
    return [c.text for c in sorted(found, key=lambda c: len(c.words) < 2)]


def mine_pairs(samples: list[CaptionedImage], count: int, rng: random.Random) -> list[Pair]:
    """`count` pairs of images whose captions share words, found through a word index."""
    index: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        for w in sorted({w for c in s.captions for w in content_words(c)}):
            index.setdefault(w, []).append(i)
    pairs: list[Pair] = []
    for _ in range(count * 20):  # bounded: a corpus without shared words yields what it can
        if len(pairs) == count:
            break
        query = rng.choice(samples)
        words = sorted({w for c in query.captions for w in content_words(c)})
        if not words:
            continue
        target = samples[rng.choice(index[rng.choice(words)])]
        if (pair := make_pair(query, target, rng)) is not None:
            pairs.append(pair)
    if not pairs:
        raise ValueError("no two captions in the corpus share a phrase; cannot build training pairs")
    return pairs


def join(phrases: list[str], limit: int = 3) -> str:
    phrases = list(dict.fromkeys(phrases))[:limit]
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


OPENINGS = [
    "Both the query image and the target image show {shared}.",
    "The query image and the target image have {shared} in common.",
    "Like the query image, the target image contains {shared}.",
    "The query image and the target image share a similar subject: {shared}.",
    "At first glance the query image and the target image look related, since both feature {shared}.",
]
CONTRASTS = [
    "The query image shows {qcap}, whereas the target image shows {tcap}.",
    "In the query image we see {qcap}; the target image instead presents {tcap}.",
    "Where the query image has {qcap}, the target image has {tcap}.",
]
SPECIFICS = [
    "What is specific to the target image is {specific}, which does not appear in the query image.",
    "The main difference is that the target image has {specific} rather than {missing}.",
    "The target image adds {specific}, while the query image has {missing} instead.",
    "The target image stands out because of {specific}.",
]
FILLERS = [
    "Apart from {specific}, the scene, lighting and style of the target image stay close to the query image.",
    "The overall layout is similar, but in the target image the attention moves to {first}.",
    "The colours and the composition of the target image therefore look different from the query image.",
    "Someone comparing the two would notice {first} in the target image first.",
    "The background and the framing remain broadly comparable across the two images.",
    "In short, the target image keeps {shared} but changes the rest to {specific}.",
    "Nothing else in the target image departs strongly from the query image.",
]


def describe_answer(pair: Pair, word_num: int, rng: random.Random) -> str:
    """One paragraph of 40-100 words about what the pair shares and what only the target has."""
    fields = {
        "shared": join(pair.shared, 2),
        "specific": join(pair.specific, 2),
        "missing": join(pair.missing, 2) if pair.missing else "the rest",
        "first": pair.specific[0],
        "qcap": pair.query_summary,
        "tcap": pair.target_summary,
    }
    goal = min(100, max(40, word_num + rng.randint(-15, 5)))
    parts = [rng.choice(OPENINGS)] + rng.sample([rng.choice(CONTRASTS), rng.choice(SPECIFICS)], 2)
    sentences = [s.format(**fields) for s in parts]
    for filler in rng.sample(FILLERS, len(FILLERS)):
        if len(" ".join(sentences).split()) >= goal:
            break
        sentences.append(filler.format(**fields))
    while len(" ".join(sentences).split()) > 100 and len(sentences) > 2:  # long captions: drop from the end
        sentences.pop()
    return " ".join(sentences)


INSTRUCTIONS = [
    "Find a picture like this one, but with {specific}.",
    "Show me something similar that has {specific}.",
    "I want the same kind of scene featuring {specific} instead of {missing}.",
    "Replace {missing} with {specific}.",
    "Keep the general idea but make it show {specific}.",
    "Look for an image that includes {specific}.",
    "Something close to this, except it should include {specific}.",
    "Can you find one with {specific} rather than {missing}?",
    "Same theme, but I need {specific} in it.",
    "Retrieve a related photo that clearly shows {specific}.",
    "A version of this with {first} instead.",
    "Again {shared}, but this time with {specific}.",
]


def instruct_answer(pair: Pair, n: int, rng: random.Random) -> list[str]:
    """n distinct instructions of 5-30 words stating what only the target has."""
    fields = {
        "specific": join(pair.specific, rng.choice([1, 1, 2])),  # short lines are easier for a tiny model
        "missing": join(pair.missing, 1) if pair.missing else "what is there now",
        "first": pair.specific[0],
        "shared": pair.shared[0],
    }
    lines = []
    for template in rng.sample(INSTRUCTIONS, len(INSTRUCTIONS)):
        line = template.format(**fields)
        if 5 <= len(line.split()) <= 30 and line not in lines:
            lines.append(line)
        if len(lines) == n:
            return lines
    while len(lines) < n:  # very short or long phrases: fall back to numbered variants that stay in range
        lines.append(f"Another option number {len(lines) + 1}: show {pair.specific[0]}.")
    return lines


def draw_n(rng: random.Random) -> int:
    return rng.choices([2, 3, 4, 5], weights=[2, 5, 2, 1])[0]  # mostly 3, as the pipeline asks


def numbered(lines: list[str]) -> str:
    return "\n".join(f"{i}. {line}" for i, line in enumerate(lines, 1))


def vary_lengths(demos: list[Demonstration], rng: random.Random) -> list[Demonstration]:
    """Demonstrations cut to 1..all of their instructions, so the model learns to count to the n asked
    for instead of copying the demonstrations' (always equal) number of lines."""
    return [Demonstration(d.description, d.instructions[: rng.randint(1, len(d.instructions))]) for d in demos]


def demonstration_pool(pairs: list[Pair], rng: random.Random) -> tuple[Demonstration, ...]:
    """The project's demonstrations; until that file exists, demonstrations made from our own templates."""
    if DEMONSTRATIONS_FILE.is_file():
        return load_demonstrations()
    return tuple(
        Demonstration(describe_answer(p, draw_word_num(rng), rng), tuple(instruct_answer(p, 3, rng)))
        for p in pairs[:20]
    )


# ---------------------------------------------------------------- tokenizer


def train_tokenizer(texts, out_dir, vocab_size: int = 3072):
    """A byte-level BPE tokenizer with ChatML and vision special tokens, saved to and loaded from `out_dir`."""
    from transformers import AutoTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    # GPT-2's split keeps " 3" whole: the n asked for in a prompt is then a different token from a list's "3."
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "TokenizersBackend",  # loads tokenizer.json as saved
        "eos_token": IM_END,
        "pad_token": END_OF_TEXT,
        "unk_token": None,
        "bos_token": None,
        "model_max_length": 2048,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    # transformers 5 ignores vocab files passed to the constructor; only from_pretrained reads them.
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def tokenizer_texts(samples: list[CaptionedImage], pairs: list[Pair], seed: int) -> list[str]:
    """Everything the models will read or write, so that frequent words become single tokens."""
    rng = random.Random(seed)
    texts = [c for s in samples for c in s.captions]
    texts += [load_prompt(DESCRIBE_PROMPT).text, load_prompt(INSTRUCT_PROMPT).text]
    texts += [f"Write {n} lines. Exactly {n} objects." for n in range(10) for _ in range(20)]  # " 0".." 9" tokens
    for p in pairs[:1500]:
        texts.append(describe_answer(p, draw_word_num(rng), rng))
        texts.append(numbered(instruct_answer(p, 5, rng)))
    if DEMONSTRATIONS_FILE.is_file():
        texts += [d.render() for d in load_demonstrations()]
    return texts


def shared_tokenizer(samples: list[CaptionedImage], out_dir: Path, seed: int):
    """The same tokenizer for both models: same corpus and seed give the same vocabulary."""
    pairs = mine_pairs(samples, 1500, random.Random(seed + 1))
    return train_tokenizer(tokenizer_texts(samples, pairs, seed), out_dir)


# ---------------------------------------------------------------- training


LINE_END_WEIGHT = 5.0  # where the model chooses between another line and end-of-turn: counting to n


@dataclass
class Example:
    input_ids: list[int]
    weights: list[float]  # per-token loss weight; 0 on the prompt: the loss is on the answer only
    pixel_values: torch.Tensor | None = None


def answer_example(prompt_ids: list[int], answer: str, tokenizer, pixel_values=None) -> Example:
    """Prompt (ending in the assistant header) + answer + end-of-turn, truncated to MAX_LEN."""
    answer_ids = tokenizer(answer + IM_END, add_special_tokens=False)["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(answer_ids)
    # line breaks, the last token and end-of-turn: where the model decides to go on or to stop
    line_ends = {i for i, piece in enumerate(pieces) if "Ċ" in piece} | {len(pieces) - 2, len(pieces) - 1}
    weights = [LINE_END_WEIGHT if i in line_ends else 1.0 for i in range(len(answer_ids))]
    ids = (prompt_ids + answer_ids)[:MAX_LEN]
    return Example(ids, ([0.0] * len(prompt_ids) + weights)[:MAX_LEN], pixel_values)


def collate(batch: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e.input_ids) for e in batch)
    pad = [width - len(e.input_ids) for e in batch]
    out = {
        "input_ids": torch.tensor([e.input_ids + [pad_id] * p for e, p in zip(batch, pad)]),
        "attention_mask": torch.tensor([[1] * len(e.input_ids) + [0] * p for e, p in zip(batch, pad)]),
        "weights": torch.tensor([e.weights + [0.0] * p for e, p in zip(batch, pad)]),
    }
    if batch[0].pixel_values is not None:
        out["pixel_values"] = torch.cat([e.pixel_values for e in batch])
    return out


@dataclass
class TrainReport:
    steps: int
    seconds: float
    first_loss: float
    final_loss: float  # mean over the last 10 steps


def train(
    model, phases: list[tuple[list[Example], int]], pad_id: int, seed: int, batch_size: int = 8, lr: float = 3e-3
) -> TrainReport:
    """AdamW with warmup and cosine decay over all phases, each (examples, steps) in turn; seeded batches."""
    rng = random.Random(seed)
    steps = sum(n for _, n in phases)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / steps)))
    )
    model.train()
    losses, start = [], time.perf_counter()
    for examples in (examples for examples, n in phases for _ in range(n)):
        batch = collate(rng.sample(examples, min(batch_size, len(examples))), pad_id)
        loss = answer_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    tail = losses[-10:]
    return TrainReport(steps, time.perf_counter() - start, losses[0], sum(tail) / len(tail))


def answer_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Weighted next-token loss on the answer tokens, projecting only those positions onto the vocabulary
    (the long prompts' logits are never computed)."""
    weights = batch.pop("weights")[:, 1:]
    targets = batch["input_ids"][:, 1:]
    hidden = model.model(**batch).last_hidden_state[:, :-1]
    keep = weights > 0
    losses = torch.nn.functional.cross_entropy(model.lm_head(hidden[keep]), targets[keep], reduction="none")
    return (losses * weights[keep]).sum() / weights[keep].sum()


def set_end_of_turn(model, tokenizer) -> None:
    """Generation stops at <|im_end|> and pads with <|endoftext|>, as real chat models do."""
    eos, pad = tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    for config in (model.config, model.generation_config):
        config.eos_token_id, config.pad_token_id, config.bos_token_id = eos, pad, None
    if hasattr(model.config, "text_config"):
        model.config.text_config.eos_token_id, model.config.text_config.pad_token_id = eos, pad


def write_report(out_dir: Path, report: TrainReport, **extra) -> None:
    info = {"toy_model": True, **report.__dict__, **extra}
    (out_dir / "demo_training.json").write_text(json.dumps(info, indent=2))


def fresh_dir(out_dir) -> Path:
    """An empty output folder; an old model folder there is replaced, any folder with subfolders is refused."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        if any(p.is_dir() for p in out_dir.iterdir()):
            raise FileExistsError(f"{out_dir} has subfolders: not a model folder to replace")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    return out_dir


# ---------------------------------------------------------------- the describer (VLM)


def describer_processor(tokenizer, image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE):
    from transformers import LlavaProcessor

    try:  # transformers 5: the PIL backend, which needs no torchvision
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # transformers 4
        from transformers import CLIPImageProcessor as ImageProcessor

    image_processor = ImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )


# The toy describer's towers; bench/annotate.py builds the same architecture at a real model's size.
TINY_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
TINY_TEXT = dict(hidden_size=160, intermediate_size=448, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def describer_model(tokenizer, vision: dict = TINY_VISION, text: dict = TINY_TEXT, vocab_size: int | None = None):
    """LLaVA: a CLIP vision tower feeding a Qwen2 language model, one token per image patch."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config

    vision_config = CLIPVisionConfig(**vision)
    text_config = Qwen2Config(vocab_size=vocab_size or len(tokenizer), max_position_embeddings=2048, tie_word_embeddings=True, **text)
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2,
        tie_word_embeddings=True,
    )
    return LlavaForConditionalGeneration(config)


def describer_examples(pairs: list[Pair], processor, seed: int) -> list[Example]:
    """Each pair through the processor exactly as at inference: chat template, two images, then the answer."""
    rng = random.Random(seed)
    template = load_prompt(DESCRIBE_PROMPT)
    examples = []
    for pair in pairs:
        word_num = draw_word_num(rng)
        text = describe_text(template, pair.query_caption, pair.target_caption, word_num)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": text}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        enc = processor(text=[prompt], images=[[pair.query.image, pair.target.image]], return_tensors="pt")
        answer = describe_answer(pair, word_num, rng)
        examples.append(answer_example(enc["input_ids"][0].tolist(), answer, processor.tokenizer, enc["pixel_values"]))
    return examples


def caption_examples(samples: list[CaptionedImage], count: int, processor, seed: int) -> list[Example]:
    """One image with the caption prompt, answered by its corpus caption: so the demo's VLM also serves as its captioner
    (`caption.captioner` in configs/demo.yaml) on a folder of bare images."""
    rng = random.Random(seed)
    template = load_prompt(CAPTION_PROMPT)
    examples = []
    for sample in rng.sample(samples, min(count, len(samples))):
        text = template.render(caption="(none)")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        enc = processor(text=[prompt], images=[[sample.image]], return_tensors="pt")
        answer = sample.captions[0]  # the short alt-text caption: within caption-v1's word bounds
        examples.append(answer_example(enc["input_ids"][0].tolist(), answer, processor.tokenizer, enc["pixel_values"]))
    return examples


def build_describer(out_dir, corpus: str | list[str], steps: int = 240, seed: int = 0) -> Path:
    """Train the toy describe VLM on the corpus and save model + processor to `out_dir`; a fifth of its steps go to
    captioning single images."""
    torch.manual_seed(seed)
    out_dir = fresh_dir(out_dir)
    samples = read_corpus(corpus)
    tokenizer = shared_tokenizer(samples, out_dir, seed)
    processor = describer_processor(tokenizer)
    model = describer_model(tokenizer)
    pairs = mine_pairs(samples, min(steps * 8, 2400), random.Random(seed + 2))
    examples = describer_examples(pairs, processor, seed + 3)
    captions = caption_examples(samples, len(examples) // 4, processor, seed + 5)
    report = train(model, [(examples + captions, steps)], tokenizer.pad_token_id, seed + 4)
    set_end_of_turn(model, tokenizer)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    write_report(out_dir, report, examples=len(examples), caption_examples=len(captions), images=len(samples))
    return out_dir


# ---------------------------------------------------------------- the instructor (LLM)


def instructor_model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=160, intermediate_size=448, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def instructor_examples(pairs: list[Pair], tokenizer, seed: int, demo_counts: list[int]) -> list[Example]:
    """Descriptions in our describer's style, k demonstrations (k drawn from demo_counts), n mostly 3."""
    rng = random.Random(seed)
    template = load_prompt(INSTRUCT_PROMPT)
    pool = demonstration_pool(pairs, random.Random(seed))
    examples = []
    for pair in pairs:
        n = draw_n(rng)
        description = describe_answer(pair, draw_word_num(rng), rng)
        demos = vary_lengths(draw_demonstrations(pool, rng.choice(demo_counts), rng), rng)
        content = instruct_text(template, description, demos, n)
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        examples.append(answer_example(prompt_ids, numbered(instruct_answer(pair, n, rng)), tokenizer))
    return examples


def build_instructor(out_dir, corpus: str | list[str], steps: int = 360, seed: int = 0) -> Path:
    """Train the toy instruct LLM on descriptions built from the corpus and save model + tokenizer.

    Half the steps see prompts without demonstrations, where a tiny model quickly learns to write
    exactly n lines; the other half add 1-5 demonstrations, so that it keeps counting in long prompts."""
    torch.manual_seed(seed)
    out_dir = fresh_dir(out_dir)
    samples = read_corpus(corpus)
    tokenizer = shared_tokenizer(samples, out_dir, seed)
    model = instructor_model(tokenizer)
    pairs = mine_pairs(samples, min(steps * 8, 3000), random.Random(seed + 5))
    half = len(pairs) // 2
    short = instructor_examples(pairs[:half] or pairs, tokenizer, seed + 6, demo_counts=[0])
    long = instructor_examples(pairs[half:], tokenizer, seed + 7, demo_counts=[1, 3, 5, 5])  # the pipeline asks 5
    report = train(model, [(short, steps // 2), (long, steps - steps // 2)], tokenizer.pad_token_id, seed + 8)
    set_end_of_turn(model, tokenizer)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    write_report(out_dir, report, examples=len(short) + len(long), images=len(samples))
    return out_dir
