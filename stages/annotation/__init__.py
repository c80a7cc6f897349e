"""Helpers of the annotate stage: prompts, answer validation, generation backends."""
