"""megasynth orchestration: configuration, run folder and ledger, executors, CLI, reports. Imports stages, never the reverse."""
