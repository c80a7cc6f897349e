"""megasynth stages: one module per stage, plus the helpers they share.

Stages never import `pipeline`; the pipeline composes them.
"""
