"""``POST /v1/embeddings``: the embedded MiniLM and relayed upstream models."""
