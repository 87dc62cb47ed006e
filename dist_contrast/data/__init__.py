"""Data: shard writers, WebDataset pipelines, augmentation."""
