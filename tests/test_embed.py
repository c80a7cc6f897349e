"""embed: on-device preprocessing equals the models' own processors; vectors are stored as promised."""

from __future__ import annotations

import json
import shutil
import tarfile

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from transformers import AutoImageProcessor

from conftest import captions_of, write_tar
from stages import catalog, embeddings
from stages.embed import EmbedSettings, EmbedStage, SpaceSettings, decode_pil
from stages.ingest import CorpusSettings, IngestSettings, IngestStage
from test_mine import run_mine
from stages.models.encoders import ImageEncoder, ImageTransform, TextEncoder, check_model_path


@pytest.fixture(scope="module")
def encoders(image_models) -> dict[str, ImageEncoder]:
    return {space: ImageEncoder(str(image_models[space]), torch.device("cpu"), torch.float32) for space in ("semantic", "pattern")}


@pytest.fixture(scope="module")
def catalog_dir(tmp_path_factory, corpus):
    """The first 50-image shard of the test corpus, catalogued."""
    out = tmp_path_factory.mktemp("embed") / "catalog"
    ingest = IngestStage(IngestSettings(corpus=CorpusSettings(paths=[str(corpus / "00000.tar")])), {}, out)
    for u in ingest.plan()[0]:
        ingest.process(u)
    return out


@pytest.mark.parametrize("space", ["semantic", "pattern"])
@pytest.mark.parametrize("photo", ["chelsea", "astronaut", "coffee"])
def test_device_preprocessing_matches_the_model_processor(image_models, encoders, space, photo):
    folder = str(image_models[space])
    img = Image.fromarray(getattr(skimage.data, photo)())
    reference = AutoImageProcessor.from_pretrained(folder)(images=img, return_tensors="pt")["pixel_values"]
    ours = ImageTransform.from_pretrained(folder)([torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)], torch.device("cpu"), torch.float32)
    assert ours.shape == reference.shape
    with torch.inference_mode():
        a, b = encoders[space].model(pixel_values=torch.cat([reference, ours])).pooler_output.flatten(1)
    assert torch.nn.functional.cosine_similarity(a, b, dim=0).item() > 0.999


def test_embed_stage_writes_normalised_vectors_in_catalog_order(tmp_path, catalog_dir, image_models):
    spaces = {
        "semantic": SpaceSettings(kind="image", model=str(image_models["semantic"])),
        "caption": SpaceSettings(kind="text", model=str(image_models["caption"])),
    }
    stage = EmbedStage(EmbedSettings(spaces=spaces, batch_size=16, device="cpu"), {"catalog": catalog_dir, "captions": captions_of(catalog_dir)}, tmp_path / "emb")
    stage.setup()
    stats = stage.process(stage.plan()[0][0])

    table = catalog.read(catalog_dir, "00000", columns=["id", "caption", "re_caption", "sha256"]).to_pylist()
    ids, hashes, vecs = embeddings.load(tmp_path / "emb", "semantic", "00000")
    assert list(ids) == [r["id"] for r in table] and stats.output == len(table) == 50
    assert vecs.dtype == np.float16 and vecs.shape == (50, 1280)
    np.testing.assert_allclose(np.linalg.norm(vecs.astype(np.float32), axis=1), 1.0, atol=2e-3)
    assert hashes.dtype == np.uint64 and hashes.tolist() == [embeddings.hash64(r["sha256"]) for r in table]

    cap_ids, _, cap_vecs = embeddings.load(tmp_path / "emb", "caption", "00000")
    captioned = [r["id"] for r in table if r["caption"] or r["re_caption"]]
    assert list(cap_ids) == captioned and cap_vecs.shape == (len(captioned), 384)
    assert stats.counters["no_text.caption"] == 50 - len(captioned)
    assert embeddings.read_manifests(tmp_path / "emb")["semantic"]["model"] == str(image_models["semantic"])

    # a batch of one gives the same vectors up to fp16 rounding: batching does not change results
    single = EmbedStage(EmbedSettings(spaces=spaces, batch_size=1, device="cpu"), {"catalog": catalog_dir, "captions": captions_of(catalog_dir)}, tmp_path / "emb1")
    single.setup()
    single.process(single.plan()[0][0])
    v1 = embeddings.load(tmp_path / "emb1", "semantic", "00000")[2]
    assert np.abs(v1.astype(np.float32) - vecs.astype(np.float32)).max() < 5e-3


def test_missing_model_folder_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder .* does not exist"):
        check_model_path(str(tmp_path / "no-such-model"), "embed.spaces.semantic.model")
    check_model_path("openai/clip-vit-large-patch14", "a hub id is checked when loaded")


def test_batched_jpeg_decoding_falls_back_to_pil_image_by_image(tmp_path, catalog_dir, image_models):
    """The nvJPEG path's bookkeeping, run on the CPU: PIL stands in for nvJPEG (no GPU here) and, like
    nvJPEG, fails a whole batch when it refuses one image. Refused images are decoded by PIL instead and
    counted; vectors come out identical and in catalog order, whatever the prefetch depth and pool size."""
    spaces = {"semantic": SpaceSettings(kind="image", model=str(image_models["semantic"]))}
    sizes = catalog.read(catalog_dir, "00000", columns=["size"])["size"].to_pylist()
    refused = {sizes[3], sizes[20]}

    def strict_decoder(datas: list[torch.Tensor]) -> list[torch.Tensor]:
        if any(len(d) in refused for d in datas):
            raise RuntimeError("Error while decoding JPEG images")
        return [decode_pil(d.numpy().tobytes())[0] for d in datas]

    plain = EmbedStage(EmbedSettings(spaces=spaces, batch_size=16, device="cpu"), {"catalog": catalog_dir, "captions": captions_of(catalog_dir)}, tmp_path / "plain")
    plain.setup()
    plain.process(plain.plan()[0][0])
    batched = EmbedStage(
        EmbedSettings(spaces=spaces, batch_size=16, device="cpu", prefetch=1, decode_threads=3), {"catalog": catalog_dir, "captions": captions_of(catalog_dir)}, tmp_path / "batched"
    )
    batched.setup()
    batched.nvjpeg = strict_decoder
    stats = batched.process(batched.plan()[0][0])

    fallbacks = sum(s in refused for s in sizes)
    assert stats.counters["decode.pil_fallback"] == fallbacks and stats.counters["decode.nvjpeg"] == 50 - fallbacks
    assert stats.output == 50 and not stats.rejected
    for a, b in zip(embeddings.load(tmp_path / "plain", "semantic", "00000"), embeddings.load(tmp_path / "batched", "semantic", "00000")):
        np.testing.assert_array_equal(a, b)


def test_clip_towers_load_alone_from_a_clip_folder(tmp_path, image_models):
    """A CLIP folder (as openai/clip-vit-large-patch14) serves an image space and a text space: each loads only
    its tower with projection, and gives the full model's normalised image and text features."""
    from transformers import CLIPConfig, CLIPModel

    folder = tmp_path / "clip"
    text = dict(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77, projection_dim=16)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=56, patch_size=14, projection_dim=16)
    torch.manual_seed(0)
    full = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    full.save_pretrained(folder)
    processor = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 56}, "crop_size": {"height": 56, "width": 56},
                 "do_center_crop": True, "resample": 3, "image_mean": [0.48, 0.46, 0.41], "image_std": [0.27, 0.26, 0.28]}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(image_models["caption"] / name, folder / name)

    image_enc = ImageEncoder(str(folder), torch.device("cpu"), torch.float32)
    text_enc = TextEncoder(str(folder), torch.device("cpu"), torch.float32, max_length=77)
    assert type(image_enc.model).__name__ == "CLIPVisionModelWithProjection" and image_enc.attn_implementation == "sdpa"
    assert type(text_enc.model).__name__ == "CLIPTextModelWithProjection" and text_enc.attn_implementation == "sdpa"

    images = [torch.from_numpy(np.asarray(Image.fromarray(getattr(skimage.data, p)()).convert("RGB")).copy()).permute(2, 0, 1) for p in ("chelsea", "coffee")]
    texts = ["a cat on a rug", "a cup of coffee on a saucer"]
    with torch.inference_mode():
        want_img = full.get_image_features(pixel_values=image_enc.transform(images, torch.device("cpu"), torch.float32))
        want_txt = full.get_text_features(**text_enc.tokenize(texts))
    for got, want in ((image_enc(images), want_img), (text_enc(texts), want_txt)):
        want = want if isinstance(want, torch.Tensor) else want.pooler_output
        torch.testing.assert_close(got, torch.nn.functional.normalize(want, dim=-1), atol=1e-5, rtol=1e-4)


def test_embed_then_mine_when_the_first_shard_has_nothing_to_embed(tmp_path, corpus, image_models):
    """Shard "a" (sorts first) is wholly rejected by ingest, "b" is captionless, "c" is ordinary. Every space
    file has the space's width, even with no rows, and mine (streamed or with an index) reads that width
    from space.json, not from the first shard."""
    with tarfile.open(corpus / "00000.tar") as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    keys = sorted({name.split(".")[0] for name in files})[:16]
    src = tmp_path / "src"
    src.mkdir()
    write_tar(src / "a.tar", [(name, b"not an image" if name.endswith(".jpg") else files[name]) for k in keys[:4] for name in (f"{k}.jpg", f"{k}.txt")])
    write_tar(src / "b.tar", [(f"{k}.jpg", files[f"{k}.jpg"]) for k in keys[:8]])
    write_tar(src / "c.tar", [(name, files[name]) for k in keys[8:] for name in (f"{k}.jpg", f"{k}.txt", f"{k}.json") if name in files])

    cat, emb = tmp_path / "catalog", tmp_path / "emb"
    ingest = IngestStage(IngestSettings(corpus=CorpusSettings(paths=[str(src / "*.tar")])), {}, cat)
    for u in ingest.plan()[0]:
        ingest.process(u)
    assert catalog.shards(cat) == ["a", "b", "c"] and catalog.read(cat, "a").num_rows == 0
    captioned = [r["id"] for r in catalog.read(cat, "c", columns=["id", "caption", "re_caption"]).to_pylist() if r["caption"] or r["re_caption"]]
    assert captioned

    spaces = {
        "semantic": SpaceSettings(kind="image", model=str(image_models["semantic"])),
        "caption": SpaceSettings(kind="text", model=str(image_models["caption"])),
    }
    stage = EmbedStage(EmbedSettings(spaces=spaces, batch_size=8, device="cpu"), {"catalog": cat, "captions": captions_of(cat, tmp_path / "captions")}, emb)
    stage.setup()
    units = stage.plan()[0]
    for u in units:
        stage.process(u)
    shapes = {(sp, sh): embeddings.load(emb, sp, sh)[2].shape for sp in spaces for sh in ("a", "b", "c")}
    assert shapes == {
        ("semantic", "a"): (0, 1280), ("semantic", "b"): (8, 1280), ("semantic", "c"): (8, 1280),
        ("caption", "a"): (0, 384), ("caption", "b"): (0, 384), ("caption", "c"): (len(captioned), 384),
    }  # fmt: skip
    assert {sp: m["dim"] for sp, m in embeddings.read_manifests(emb).items()} == {"semantic": 1280, "caption": 384}

    # space.json is written once, not again by every unit (an atomic rewrite would give it a new inode)
    inodes = {sp: (emb / sp / "space.json").stat().st_ino for sp in spaces}
    stage.process(units[-1])
    assert {sp: (emb / sp / "space.json").stat().st_ino for sp in spaces} == inodes

    inputs = {"catalog": cat, "embeddings": emb}
    mined = {}
    for name, extra in {"flat": {}, "ivf": {"index": "IVF2,Flat", "search_params": "nprobe=2"}}.items():
        mined[name] = run_mine(tmp_path / name, inputs, k=4, band=(0.0, 0.9999), **extra)[0]
    assert mined["flat"] == mined["ivf"] and mined["flat"]
    assert all(r["query_id"][0] in "bc" and r["target_id"][0] in "bc" for r in mined["flat"])
    for r in mined["flat"]:
        if any(s["space"] == "caption" for s in r["spaces"]):
            assert r["query_id"] in captioned and r["target_id"] in captioned
