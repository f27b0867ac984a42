"""LlamaIndex integration of E5-V multimodal embeddings."""

from llama_index.embeddings.e5v.base import E5VEmbedding
from llama_index.embeddings.e5v.pdf import E5VPDFReader

__all__ = ["E5VEmbedding", "E5VPDFReader"]
