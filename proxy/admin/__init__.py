"""Administration: API keys at rest, the tenants and adapters registries, and the
admin API over them."""
