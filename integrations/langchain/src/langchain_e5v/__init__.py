"""LangChain integration of E5-V multimodal embeddings."""

from langchain_e5v.embeddings import E5VEmbeddings
from langchain_e5v.pdf import E5VPDFLoader

__all__ = ["E5VEmbeddings", "E5VPDFLoader"]
