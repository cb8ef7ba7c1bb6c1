"""Data layer: embedded dataset, WebDataset shards on disk/S3, streaming loader."""
