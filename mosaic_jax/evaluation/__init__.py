"""Evaluation: multi-label metrics, t-SNE, retrieval, label-efficiency curves and the report."""
