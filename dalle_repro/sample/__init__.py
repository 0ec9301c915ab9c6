"""Sampling from a trained prior: generation with the KV cache, CLIP reranking, the export folder."""
