"""Inference with an export: embeddings of a dataset split, and maps of whole scenes."""
