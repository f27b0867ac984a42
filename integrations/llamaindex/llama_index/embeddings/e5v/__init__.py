"""LlamaIndex integration of E5-V multimodal embeddings."""

from llama_index.embeddings.e5v.base import E5VEmbedding

__all__ = ["E5VEmbedding"]
