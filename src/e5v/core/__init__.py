"""The core: inputs (normalised, validated, bounded), prompts, batching, the embedding cache
and the embedder's pipeline from inputs to numpy vectors; :mod:`e5v.core.protocol` is the
``Embedder`` protocol that the local model and the HTTP client both keep."""
