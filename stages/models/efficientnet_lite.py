"""EfficientNet-Lite as a transformers model type ("efficientnet_lite").

EfficientNet-Lite is EfficientNet without squeeze-excite, with ReLU6 and a fixed 32-channel stem and
1280-channel head (https://github.com/tensorflow/tpu/tree/master/models/official/efficientnet/lite).
The defaults describe Lite0. Importing this module registers the config and models with the Auto classes,
so `AutoModel.from_pretrained(folder)` works on folders written by `demo.convert`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import (
    BaseModelOutputWithPoolingAndNoAttention,
    ImageClassifierOutputWithNoAttention,
)


class EfficientNetLiteConfig(PretrainedConfig):
    model_type = "efficientnet_lite"
    attribute_map = {"hidden_size": "head_channels"}  # embedding consumers read config.hidden_size

    # Classic __init__ (not dataclass fields) so the config works on transformers 4.x and 5.x alike.
    def __init__(
        self,
        num_channels: int = 3,
        stem_channels: int = 32,
        head_channels: int = 1280,
        stage_repeats: list[int] = (1, 2, 2, 3, 3, 4, 1),
        stage_kernel_sizes: list[int] = (3, 3, 5, 3, 5, 5, 3),
        stage_strides: list[int] = (1, 2, 2, 2, 1, 2, 1),
        stage_expand_ratios: list[int] = (1, 6, 6, 6, 6, 6, 6),
        stage_out_channels: list[int] = (16, 24, 40, 80, 112, 192, 320),
        batch_norm_eps: float = 1e-3,
        dropout_rate: float = 0.2,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        self.num_channels = num_channels
        self.stem_channels = stem_channels
        self.head_channels = head_channels
        self.stage_repeats = list(stage_repeats)
        self.stage_kernel_sizes = list(stage_kernel_sizes)
        self.stage_strides = list(stage_strides)
        self.stage_expand_ratios = list(stage_expand_ratios)
        self.stage_out_channels = list(stage_out_channels)
        self.batch_norm_eps = batch_norm_eps
        self.dropout_rate = dropout_rate
        self.initializer_range = initializer_range
        super().__init__(**kwargs)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding (extra pixel right/bottom), which the TF-trained weights expect."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


class ConvBN(nn.Module):
    def __init__(self, config, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True):
        super().__init__()
        self.conv = SameConv2d(in_ch, out_ch, kernel, stride, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_ch, eps=config.batch_norm_eps)
        self.act = nn.ReLU6() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class EfficientNetLiteBlock(nn.Module):
    """Inverted residual (MBConv) without squeeze-excite; expand_ratio 1 gives the depthwise-separable block."""

    def __init__(self, config, in_ch: int, out_ch: int, kernel: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = in_ch * expand_ratio
        self.expand = ConvBN(config, in_ch, hidden, 1) if expand_ratio != 1 else nn.Identity()
        self.depthwise = ConvBN(config, hidden, hidden, kernel, stride, groups=hidden)
        self.project = ConvBN(config, hidden, out_ch, 1, act=False)  # linear bottleneck
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.residual else out


class EfficientNetLitePreTrainedModel(PreTrainedModel):
    config_class = EfficientNetLiteConfig
    base_model_prefix = "efficientnet_lite"
    main_input_name = "pixel_values"
    _no_split_modules = ["EfficientNetLiteBlock"]


class EfficientNetLiteModel(EfficientNetLitePreTrainedModel):
    _keys_to_ignore_on_load_unexpected = [r"^classifier\."]  # loading features from a classifier checkpoint is intended

    def __init__(self, config: EfficientNetLiteConfig):
        super().__init__(config)
        self.stem = ConvBN(config, config.num_channels, config.stem_channels, 3, 2)
        blocks, in_ch = [], config.stem_channels
        for repeats, kernel, stride, expand, out_ch in zip(
            config.stage_repeats, config.stage_kernel_sizes, config.stage_strides,
            config.stage_expand_ratios, config.stage_out_channels,
        ):
            for i in range(repeats):
                blocks.append(EfficientNetLiteBlock(config, in_ch, out_ch, kernel, stride if i == 0 else 1, expand))
                in_ch = out_ch
        self.blocks = nn.ModuleList(blocks)
        self.head = ConvBN(config, in_ch, config.head_channels, 1)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> tuple | BaseModelOutputWithPoolingAndNoAttention:
        output_hidden_states = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        hidden = self.stem(pixel_values)
        all_hidden = [hidden]
        for block in self.blocks:
            hidden = block(hidden)
            all_hidden.append(hidden)
        hidden = self.head(hidden)
        pooled = hidden.mean(dim=(2, 3))
        all_hidden = tuple(all_hidden) + (hidden,) if output_hidden_states else None
        if not return_dict:
            return tuple(v for v in (hidden, pooled, all_hidden) if v is not None)
        return BaseModelOutputWithPoolingAndNoAttention(
            last_hidden_state=hidden, pooler_output=pooled, hidden_states=all_hidden
        )


class EfficientNetLiteForImageClassification(EfficientNetLitePreTrainedModel):
    def __init__(self, config: EfficientNetLiteConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.efficientnet_lite = EfficientNetLiteModel(config)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.classifier = nn.Linear(config.head_channels, config.num_labels)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> tuple | ImageClassifierOutputWithNoAttention:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.efficientnet_lite(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.classifier(self.dropout(outputs.pooler_output))
        loss = self.loss_function(labels, logits, self.config) if labels is not None else None
        if not return_dict:
            output = (logits,) + ((outputs.hidden_states,) if outputs.hidden_states is not None else ())
            return ((loss,) + output) if loss is not None else output
        return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


AutoConfig.register(EfficientNetLiteConfig.model_type, EfficientNetLiteConfig, exist_ok=True)
AutoModel.register(EfficientNetLiteConfig, EfficientNetLiteModel, exist_ok=True)
AutoModelForImageClassification.register(EfficientNetLiteConfig, EfficientNetLiteForImageClassification, exist_ok=True)
