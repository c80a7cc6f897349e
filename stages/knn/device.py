"""Where a kNN backend runs: `mine.device` resolved per backend, and faiss's GPU resources."""

from __future__ import annotations

from functools import lru_cache


def faiss_gpus() -> int:
    """GPUs this faiss build can use (0 for faiss-cpu, which has no `get_num_gpus` on some builds)."""
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def resolve(device: str, backend: str) -> str:
    """`auto` is the GPU when the backend can use one here; `cpu` and `cuda` are taken as given."""
    if device != "auto":
        return device
    if backend == "torch-exact":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if faiss_gpus() > 0 else "cpu"


@lru_cache(maxsize=None)
def faiss_gpu_resources():
    """One StandardGpuResources per process: it owns scratch memory and streams, so it is shared."""
    if faiss_gpus() == 0:
        raise ValueError(
            "mine.device=cuda with mine.backend=faiss needs faiss built with GPU support "
            "(install megasynth[gpu] instead of megasynth[cpu]), or set mine.device: cpu"
        )
    import faiss

    return faiss.StandardGpuResources()

