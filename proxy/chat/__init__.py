"""``POST /v1/chat/completions``: its protocol, its serving and its route."""
