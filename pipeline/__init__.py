"""Distributed training pipeline for modern image-classification networks."""
