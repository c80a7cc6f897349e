"""embed: on-device preprocessing equals the models' own processors; vectors are stored as promised."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from transformers import AutoImageProcessor

from stages import catalog, embeddings
from stages.embed import EmbedSettings, EmbedStage, SpaceSettings
from stages.ingest import CorpusSettings, IngestSettings, IngestStage
from stages.models.encoders import ImageEncoder, ImageTransform, check_model_path


@pytest.mark.parametrize("space", ["semantic", "pattern"])
@pytest.mark.parametrize("photo", ["chelsea", "astronaut", "coffee"])
def test_device_preprocessing_matches_the_model_processor(image_models, space, photo):
    folder = str(image_models[space])
    img = Image.fromarray(getattr(skimage.data, photo)())
    reference = AutoImageProcessor.from_pretrained(folder)(images=img, return_tensors="pt")["pixel_values"]
    ours = ImageTransform.from_pretrained(folder)([torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)], torch.device("cpu"), torch.float32)
    assert ours.shape == reference.shape
    enc = ImageEncoder(folder, torch.device("cpu"), torch.float32)
    with torch.inference_mode():
        a, b = enc.model(pixel_values=reference).pooler_output, enc.model(pixel_values=ours).pooler_output
    assert torch.nn.functional.cosine_similarity(a, b).item() > 0.999


def test_embed_stage_writes_normalised_vectors_in_catalog_order(tmp_path, corpus, image_models):
    ingest = IngestStage(IngestSettings(corpus=CorpusSettings(paths=[str(corpus / "00000.tar")])), {}, tmp_path / "catalog")
    for u in ingest.plan()[0]:
        ingest.process(u)
    spaces = {
        "semantic": SpaceSettings(kind="image", model=str(image_models["semantic"])),
        "caption": SpaceSettings(kind="text", model=str(image_models["caption"])),
    }
    stage = EmbedStage(EmbedSettings(spaces=spaces, batch_size=16, device="cpu"), {"catalog": tmp_path / "catalog"}, tmp_path / "emb")
    stage.setup()
    stats = stage.process(stage.plan()[0][0])

    table = catalog.read(tmp_path / "catalog", "00000", columns=["id", "caption", "re_caption"]).to_pylist()
    ids, hashes, vecs = embeddings.load(tmp_path / "emb", "semantic", "00000")
    assert list(ids) == [r["id"] for r in table] and stats.output == len(table) == 50
    assert vecs.dtype == np.float16 and vecs.shape == (50, 1280)
    np.testing.assert_allclose(np.linalg.norm(vecs.astype(np.float32), axis=1), 1.0, atol=2e-3)
    assert len(set(hashes.tolist())) <= 50

    cap_ids, _, cap_vecs = embeddings.load(tmp_path / "emb", "caption", "00000")
    captioned = [r["id"] for r in table if r["caption"] or r["re_caption"]]
    assert list(cap_ids) == captioned and cap_vecs.shape == (len(captioned), 384)
    assert stats.counters["no_text.caption"] == 50 - len(captioned)
    assert embeddings.read_manifests(tmp_path / "emb")["semantic"]["model"] == str(image_models["semantic"])

    # a batch of one gives the same vectors up to fp16 rounding: batching does not change results
    single = EmbedStage(EmbedSettings(spaces=spaces, batch_size=1, device="cpu"), {"catalog": tmp_path / "catalog"}, tmp_path / "emb1")
    single.setup()
    single.process(single.plan()[0][0])
    v1 = embeddings.load(tmp_path / "emb1", "semantic", "00000")[2]
    assert np.abs(v1.astype(np.float32) - vecs.astype(np.float32)).max() < 5e-3


def test_missing_model_folder_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder .* does not exist"):
        check_model_path(str(tmp_path / "no-such-model"), "embed.spaces.semantic.model")
    check_model_path("openai/clip-vit-large-patch14", "a hub id is checked when loaded")
