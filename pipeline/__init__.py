"""megasynth orchestration: configuration, run folder and ledger, executors, CLI, reports. Imports stages, never the reverse.

The Python API (`pipeline.api`): `from pipeline import load_config, run, status, triplets`.
"""

API = ("load_config", "run", "status", "triplets")


def __getattr__(name: str):
    """The API, imported on first use: `import pipeline.cli` stays light."""
    if name in API:
        from pipeline import api

        return getattr(api, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
