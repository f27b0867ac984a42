"""LangChain integration of E5-V multimodal embeddings."""

from langchain_e5v.embeddings import E5VEmbeddings

__all__ = ["E5VEmbeddings"]
