"""Executor policies as plain functions: how a worker's resources are asked of Ray."""

from __future__ import annotations


def test_an_engine_over_several_gpus_reserves_them_as_one_group(tmp_path):
    """vLLM with tensor_parallel_size 4: four one-GPU bundles, packed over nodes if no node has four."""
    from pipeline.executors import can_host, engine_bundles
    from stages.annotate import AnnotateSettings, AnnotateStage

    assert engine_bundles(2, 4) == [{"GPU": 1, "CPU": 2}, {"GPU": 1, "CPU": 1}, {"GPU": 1, "CPU": 1}, {"GPU": 1, "CPU": 1}]
    two_by_two = [{"CPU": 8, "GPU": 2}, {"CPU": 8, "GPU": 2}]
    assert can_host(two_by_two, 1, 0, engine_gpus=4) and not can_host(two_by_two, 1, 4)  # only as a group
    assert not can_host([{"CPU": 8, "GPU": 2}], 1, 0, engine_gpus=4) and not can_host([{"CPU": 8}], 1, 1)
    engine = {"backend": "vllm", "model": "m", "tensor_parallel_size": 4}
    res = AnnotateStage(AnnotateSettings(describer=engine, instructor={**engine, "tensor_parallel_size": 2}), {}, tmp_path).resources()
    assert (res.gpus, res.engine_gpus) == (0, 4)
