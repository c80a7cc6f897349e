"""Corpus readers: WebDataset tars, parquet, image folders."""
