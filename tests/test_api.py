"""The Python API as a notebook uses it: inside a running event loop."""

from __future__ import annotations

import asyncio

from PIL import Image


def test_the_api_runs_a_variant_and_reads_its_triplets_inside_an_event_loop(local_run, pipeline_config, tmp_path):
    from pipeline import load_config, run, status, triplets

    async def notebook_cell():  # Jupyter runs cells inside its own loop
        cfg = load_config(pipeline_config, ["mine.hard_negatives=1"])
        return run(cfg, tmp_path / "hn1", reuse=[local_run], progress=False)

    summary = asyncio.run(notebook_cell())
    assert summary["search"]["source"] == str(local_run) and summary["write"]["done"]
    assert status(tmp_path / "hn1")["stages"]["write"]["output"] == summary["write"]["output"] > 0
    first = next(triplets(tmp_path / "hn1", limit=1))
    assert isinstance(first["query"], Image.Image) and first["instructions"] and len(first["provenance"]["hard_negatives"]) <= 1


def test_the_endpoint_client_works_inside_a_running_event_loop(text_models):
    """asyncio.run inside a running loop raised RuntimeError: the openai client now runs its loop on a thread."""
    from openai_server import OpenAIServer, load_generators

    from stages.annotation.backends import ChatRequest, OpenAISettings, make_generator

    served = load_generators({"instructor": (str(text_models["instructor"]), False)})
    with OpenAIServer(served) as srv:
        gen = make_generator(OpenAISettings(backend="openai", model="instructor", base_url=srv.base_url, max_new_tokens=20), vision=False)

        async def cell():
            return gen.generate([ChatRequest("Description: two red squares.\nInstructions:", (), seed=3)])

        answers = asyncio.run(cell())
    assert isinstance(answers[0], str) and answers[0]
