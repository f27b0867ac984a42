"""A collection: files walked safely, passages, records, PDF pages, the index pipeline and
the Chroma repository that keeps them."""
