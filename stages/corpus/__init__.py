"""Corpus readers (WebDataset tars, parquet, image folders) and the synthetic corpus generator."""
