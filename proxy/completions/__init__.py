"""``POST /v1/completions`` (OpenAI's legacy text completions): its protocol, its serving
through the memory pipeline, and its route."""
