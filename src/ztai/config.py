"""Settings: one YAML file (`ztai.yaml`), every key overridable by `ZTAI_*` environment variables.

Nested keys use a double underscore: `ZTAI_STORE__URL`, `ZTAI_IDENTITY__DEFAULT_TTL_SECONDS`.
Relative paths in the file are relative to the file's own directory, so a config works wherever
the command is started from. Unknown keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from ztai.detect.base import IDENTIFYING_TYPES, PERSON_MIN_SCORE
from ztai.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("ztai.yaml")
_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]{1,255}$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8787, ge=1, le=65535)
    workers: int = Field(1, ge=1, le=64)
    max_body_bytes: int = Field(1_048_576, ge=1024, le=64 * 1_048_576)
    max_json_depth: int = Field(32, ge=2, le=256)
    # Connections (ztai.gateway.connection): what one client may hold open, and for how long.
    max_header_bytes: int = Field(65_536, ge=1024, le=1_048_576)  # request line + headers; more: 431
    max_headers: int = Field(100, ge=8, le=1000)  # header fields; more: 400
    header_timeout_seconds: float = Field(10.0, ge=0.1, le=300)  # the head must arrive within this: 408
    body_timeout_seconds: float = Field(60.0, ge=0.1, le=3600)  # the whole body, after the head: 408
    keep_alive_timeout_seconds: int = Field(5, ge=1, le=300)  # an idle keep-alive connection is closed
    max_connections: int = Field(4096, ge=1, le=1_000_000)  # per worker (and the open-file limit); more: 503
    # One JSON line per request (ztai.gateway.access_log): false (off), true (stderr) or a file path
    # (relative to this file; several workers append to the same file).
    access_log: bool | str = False

    @field_validator("access_log", mode="before")
    @classmethod
    def _access_log_target(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in ("", "false", "no", "off", "0"):
            return False
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1", "stderr", "-"):
            return True
        return value


class StoreSettings(_Section):
    url: str = ""  # empty: SQLite file `ztai.db` inside data_dir
    sqlite_synchronous: Literal["NORMAL", "FULL"] = "FULL"
    pool_size: int = Field(5, ge=1, le=100)
    # Shared fast state for several replicas: agent sessions, task revocations (pub/sub). Empty:
    # in-process state (one process) and revocations shared through the database by polling.
    redis_url: str = ""
    # Connect and command timeout of every Redis call: an outage answers 503 within this, never hangs.
    redis_timeout_seconds: float = Field(2.0, gt=0, le=30)

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value


AUTHORITY_CLAIMS = ("models", "groups", "scopes", "tools", "roles")


class ClaimMapping(_Section):
    """How one of an external issuer's claims becomes a ztai authority claim: its values are translated
    through `values`; a value not listed there is dropped (never passed through)."""

    claim: str = Field("", max_length=128)  # the issuer's claim to read; empty: the same name
    values: dict[str, str] = Field(default_factory=dict, max_length=1024)  # issuer value -> ztai value


ClaimMap = dict[Literal["models", "groups", "scopes", "tools", "roles"], ClaimMapping]


class ExternalIssuerSettings(_Section):
    """An external OIDC issuer whose tokens are accepted (verified against its JWKS)."""

    issuer: str
    audience: str
    # Principals of this issuer are spiffe://<trust_domain>/<principal_kind>/<name>/<sub>, so they never
    # collide with ztai-issued identities or with another issuer's subjects. Empty: the issuer's host.
    name: str = ""
    jwks_url: str = ""
    jwks_file: str = ""
    refresh_seconds: float = Field(300.0, ge=1.0)
    algorithms: list[str] = ["RS256", "ES256", "EdDSA"]
    principal_kind: Literal["user", "agent", "service", "model"] = "user"
    subject_claim: str = "sub"
    # The authority claims policies read (roles, models, tools, groups, scopes) count only through this
    # map, e.g. {roles: {claim: groups, values: {idp-admins: admin}}}: an unmapped one is dropped.
    claim_map: ClaimMap = {}

    @model_validator(mode="after")
    def _one_jwks_source(self) -> ExternalIssuerSettings:
        if bool(self.jwks_url) == bool(self.jwks_file):
            raise ValueError("set exactly one of jwks_url or jwks_file")
        if not self.name:
            host = self.issuer.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0]
            self.name = re.sub(r"[^A-Za-z0-9._-]", "-", host) or "external"
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,128}", self.name):
            raise ValueError("name must be letters, digits, '.', '-' or '_'")
        return self


class SpiffeBundleSettings(_Section):
    """A SPIFFE trust bundle (JWKS form) whose JWT-SVIDs are accepted."""

    trust_domain: str
    bundle_file: str
    audience: str = "ztai"
    claim_map: ClaimMap = {}  # as for external_issuers: a JWT-SVID's authority claims count only mapped


class IdentitySettings(_Section):
    issuer: str = ""  # empty: spiffe://<trust_domain>/service/ztai
    audience: str = "ztai"
    default_ttl_seconds: int = Field(300, ge=1)
    max_ttl_seconds: int = Field(3600, ge=1)
    leeway_seconds: int = Field(5, ge=0, le=300)
    max_token_bytes: int = Field(8192, ge=256, le=65536)
    algorithms: list[Literal["EdDSA", "ES256"]] = ["EdDSA"]
    verified_cache_size: int = Field(100_000, ge=0)
    revocation_refresh_seconds: float = Field(1.0, gt=0)
    external_issuers: list[ExternalIssuerSettings] = []
    spiffe_bundles: list[SpiffeBundleSettings] = []

    @model_validator(mode="after")
    def _ttl_order(self) -> IdentitySettings:
        if self.default_ttl_seconds > self.max_ttl_seconds:
            raise ValueError("default_ttl_seconds must not exceed max_ttl_seconds")
        return self


class PolicySettings(_Section):
    dir: str = "policies"
    entities_file: str = ""  # optional static Cedar entities (JSON), parsed once
    # How often each worker looks for a `ztai policy reload` request in the store (with Redis configured
    # it is also told at once).
    reload_poll_seconds: float = Field(1.0, gt=0, le=300)


class WitnessSettings(_Section):
    """Where each signed checkpoint is also sent, out of reach of whoever controls the database, so
    `ztai audit verify --witness` can tell when the newest checkpoints and events were deleted."""

    file: str = ""  # append-only JSON lines, one checkpoint each
    url: str = ""  # POST each checkpoint (JSON) here; retried with backoff, never on the request path
    token_env: str = ""  # the variable holding a bearer token for `url`, if it wants one
    ocsf: bool = False  # also write each checkpoint into `audit.ocsf_file` (activity audit.checkpoint)
    timeout_seconds: float = Field(5.0, gt=0, le=60)
    max_pending: int = Field(10_000, ge=1)  # per witness; beyond it the oldest are dropped (counted)

    @field_validator("url")
    @classmethod
    def _http(cls, url: str) -> str:
        if url and not url.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return url


class AuditSettings(_Section):
    checkpoint_interval_seconds: float = Field(2.0, gt=0)
    # Events older than this without a checkpoint make /readyz not ready and `ztai audit verify` fail.
    # Empty: 5 checkpoint intervals, at least 30 s.
    max_uncovered_seconds: float | None = Field(None, gt=0)
    batch_max_events: int = Field(512, ge=1, le=10_000)
    ocsf_file: str = ""  # optional OCSF JSON-lines export for SIEMs
    # False: the audit commit runs while the upstream call is in flight, and no byte of the response is
    # sent before it is durable (a failed commit still refuses the request). True: commit, then forward.
    commit_before_forward: bool = False
    # Failed authentications are audited (`auth.failed`): at most this many per client address and reason
    # per window (per worker); the rest are counted in one `auth.failures_suppressed` event per window.
    auth_failures_per_window: int = Field(10, ge=0, le=10_000)
    auth_failure_window_seconds: float = Field(60.0, gt=0, le=86_400)

    witness: WitnessSettings = WitnessSettings()

    @model_validator(mode="after")
    def _bound_above_interval(self) -> AuditSettings:
        if (
            self.max_uncovered_seconds is not None
            and self.max_uncovered_seconds <= self.checkpoint_interval_seconds
        ):
            raise ValueError("max_uncovered_seconds must be longer than checkpoint_interval_seconds")
        if self.witness.ocsf and not self.ocsf_file:
            raise ValueError("witness.ocsf needs audit.ocsf_file")
        return self

    @property
    def uncovered_bound(self) -> float:
        """How long events may wait for a checkpoint before the log counts as failing."""
        return self.max_uncovered_seconds or max(30.0, 5 * self.checkpoint_interval_seconds)


DETECTOR_NAMES = ("injection", "pii", "secrets", "canary")


class RouteDetectors(_Section):
    input: list[str] = ["injection", "pii", "secrets"]
    output: list[str] = ["pii", "secrets"]
    # All the texts of one request together (messages, tool-call arguments, inputs); more is refused
    # (413) rather than scanned: scanning costs time in proportion to the text.
    max_input_chars: int = Field(500_000, ge=1_000, le=16_000_000)

    @field_validator("input", "output")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        unknown = sorted(set(names) - set(DETECTOR_NAMES))
        if unknown:
            raise ValueError(f"unknown detectors {unknown}; known: {', '.join(DETECTOR_NAMES)}")
        return names


class VaultSettings(_Section):
    """Session tokenization vaults (ztai.detect.vault): requests naming a session (`x-ztai-session`, or
    a task token's root task) share placeholders, and the values are kept encrypted in the store."""

    enabled: bool = True
    ttl_seconds: int = Field(3600, ge=60, le=30 * 86400)  # after the session's last tokenizing request
    max_entries: int = Field(10_000, ge=1, le=1_000_000)  # per session; beyond: redacted for good
    purge_interval_seconds: float = Field(60.0, gt=0)


class PiiSettings(_Section):
    """Which personal-data findings count as identifying (`Finding.identifying`,
    `context.content.pii_identifying_types`): the ones the shipped `tokenize-pii` policy replaces. Every
    type is still reported (audit, `context.content.pii_types`)."""

    identifying_types: list[str] = list(IDENTIFYING_TYPES)
    # A PERSON finding is identifying from this tagger confidence on, and only name-shaped (two name words,
    # or an honorific and one); calibrated for precision >= 0.9 on held-out presidio templates.
    person_min_score: float = Field(PERSON_MIN_SCORE, ge=0.0, le=1.0)


class DetectSettings(_Section):
    """Which content detectors run on which route (ztai.detect); policy decides what findings mean."""

    chat: RouteDetectors = RouteDetectors()
    # Embedding inputs are only scanned for secrets by default: a vector of a text with placeholders is a
    # different vector, so personal data there is left alone unless `pii` is added here (then the same
    # policies apply: identifying values are tokenized).
    embeddings: RouteDetectors = RouteDetectors(input=["secrets"], output=[])
    pii: PiiSettings = PiiSettings()
    stream_holdback_chars: int = Field(64, ge=0, le=4096)
    # Put a canary token into every chat request's system prompt (one per session, `x-ztai-session`
    # header, else per request); its appearance in an answer or a request is a leak (context.content.canary).
    canaries: bool = False
    vault: VaultSettings = VaultSettings()
    # Findings of the pure detectors (injection, pii, secrets) per (detector, source, text), kept so that a
    # conversation resent on every turn is not scanned again: at most this many entries (0: no cache) and
    # about this many characters (ztai.detect.inspector.ScanCache).
    scan_cache_entries: int = Field(4096, ge=0, le=1_000_000)
    scan_cache_chars: int = Field(1_048_576, ge=0, le=1_073_741_824)


class ToolSettings(_Section):
    """Operator overrides for one MCP tool's annotations (they win over what the server declares)."""

    read_only: bool | None = None
    destructive: bool | None = None
    open_world: bool | None = None
    idempotent: bool | None = None
    # Arguments whose values name who or where data goes (recipients, accounts, URLs, paths).
    sensitive_arguments: list[str] | None = None


class McpServerSettings(_Section):
    """An upstream MCP server proxied at /mcp/<name> (streamable HTTP transport)."""

    url: str
    api_key_env: str = ""  # environment variable with a bearer token for the upstream; never the token
    timeout_seconds: float = Field(30.0, gt=0)
    max_response_bytes: int = Field(4 * 1_048_576, ge=1024, le=64 * 1_048_576)
    max_event_bytes: int = Field(4 * 1_048_576, ge=1024, le=64 * 1_048_576)  # one SSE event of an answer
    # Results of this server's tools are trusted content (e.g. an internal, curated system). Default:
    # untrusted unless a tool says `openWorldHint: false`.
    trusted: bool = False
    tools: dict[str, ToolSettings] = {}

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")


class AgentSettings(_Section):
    """Agents under zero trust (ztai.agents): task tokens, MCP gateway, session taint, approvals."""

    default_task_ttl_seconds: int = Field(900, ge=1)
    max_task_ttl_seconds: int = Field(3600, ge=1)
    max_delegation_depth: int = Field(4, ge=1, le=16)
    approval_ttl_seconds: int = Field(3600, ge=1)
    # Injection probability from which a window of untrusted content counts as suspicious for value
    # provenance (context.tool.args_from_suspicious); unset: the detector's own calibrated flag threshold
    # (the instruction spans below carry the defence; a lower value trades utility for nothing measured).
    suspicion_threshold: float | None = Field(None, ge=0.0, le=1.0)
    # Values inside instruction-like sentences of untrusted content ("send ... to X", "you must ...") count
    # as suspicious too, without any model (ztai.detect.instructions): the defence that holds when the
    # injection detector does not recognise the text.
    instruction_spans: bool = True
    session_ttl_seconds: int = Field(7200, ge=60)
    max_session_values: int = Field(50_000, ge=100)
    # Where task sessions (taint, value provenance, call budgets) live. auto: Redis when store.redis_url
    # is set, else the SQL store when several workers (server.workers, `ztai serve --workers`) or
    # PostgreSQL say the state must be shared, else this process. memory with several workers is refused.
    session_store: Literal["auto", "memory", "sql", "redis"] = "auto"
    mcp_servers: dict[str, McpServerSettings] = {}

    @model_validator(mode="after")
    def _ttl_order(self) -> AgentSettings:
        if self.default_task_ttl_seconds > self.max_task_ttl_seconds:
            raise ValueError("default_task_ttl_seconds must not exceed max_task_ttl_seconds")
        bad = [name for name in self.mcp_servers if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", name)]
        if bad:
            raise ValueError(f"MCP server names must be letters, digits, '.', '-' or '_': {bad}")
        return self


class UpstreamSettings(_Section):
    base_url: str
    api_key_env: str = ""  # name of the environment variable holding the key; never the key itself
    models: list[str] = []
    timeout_seconds: float = Field(60.0, gt=0)
    # An answer (a whole stream, or a body after decompression) over this is refused (502), as is one
    # stream event over `max_event_bytes`.
    max_response_bytes: int = Field(16 * 1_048_576, ge=1024, le=256 * 1_048_576)
    max_event_bytes: int = Field(1_048_576, ge=1024, le=64 * 1_048_576)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")


class Settings(BaseSettings):
    """All of ztai's settings. Build with `load_settings(path)`."""

    model_config = SettingsConfigDict(
        env_prefix="ZTAI_",
        env_nested_delimiter="__",
        extra="forbid",
        nested_model_default_partial_update=True,
    )

    trust_domain: str = "example.org"
    data_dir: str = ".ztai"
    server: ServerSettings = ServerSettings()
    store: StoreSettings = StoreSettings()
    identity: IdentitySettings = IdentitySettings()
    policy: PolicySettings = PolicySettings()
    audit: AuditSettings = AuditSettings()
    detect: DetectSettings = DetectSettings()
    agents: AgentSettings = AgentSettings()
    upstreams: dict[str, UpstreamSettings] = {}

    # Where the settings came from; relative paths resolve against it. Not a setting itself.
    config_dir: Path = Field(default=Path("."), exclude=True)

    @field_validator("trust_domain")
    @classmethod
    def _valid_trust_domain(cls, value: str) -> str:
        if not _TRUST_DOMAIN.match(value):
            raise ValueError("must be lowercase letters, digits, '.', '-' or '_'")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file (if any) is named by `load_settings` in a per-file subclass's model_config.
        return init_settings, env_settings, YamlConfigSettingsSource(settings_cls)

    @model_validator(mode="after")
    def _session_store_reachable(self) -> Settings:
        if self.agents.session_store == "redis" and not self.store.redis_url:
            raise ValueError("agents.session_store redis needs store.redis_url")
        return self

    def session_backend(self, workers: int | None = None) -> Literal["memory", "sql", "redis"]:
        """Where agent sessions live (`agents.session_store` resolved for `workers` processes, default
        server.workers)."""
        chosen = self.agents.session_store
        if chosen != "auto":
            return chosen
        if self.store.redis_url:
            return "redis"
        if (workers or self.server.workers) > 1 or self.store_url.startswith("postgresql"):
            return "sql"
        return "memory"

    def shared_state_problem(self, workers: int) -> str | None:
        """Why `workers` processes must not serve with these settings (state one worker alone would
        hold), or None."""
        if workers > 1 and self.session_backend(workers) == "memory":
            return (
                f"{workers} workers with agents.session_store memory: each worker would keep its own "
                "agent sessions, so content read through one worker would not hold calls in another. "
                "Set store.redis_url, or agents.session_store: sql (or auto), or run --workers 1"
            )
        return None

    # Derived paths ---------------------------------------------------------------------------
    def path(self, value: str) -> Path:
        """Resolve a configured path against the config file's directory."""
        candidate = Path(value).expanduser()
        return candidate if candidate.is_absolute() else (self.config_dir / candidate).resolve()

    @property
    def data_path(self) -> Path:
        return self.path(self.data_dir)

    @property
    def store_url(self) -> str:
        return self.store.url or f"sqlite:///{self.data_path / 'ztai.db'}"

    @property
    def issuer(self) -> str:
        return self.identity.issuer or f"spiffe://{self.trust_domain}/service/ztai"

    @property
    def policy_path(self) -> Path:
        return self.path(self.policy.dir)


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Read settings from the YAML file (if it exists), then `ZTAI_*` variables, then `overrides`.

    Raises `ConfigError` naming the offending key when anything is invalid.
    """
    config_path = Path(path) if path is not None else Path(os.environ.get("ZTAI_CONFIG", DEFAULT_CONFIG_PATH))
    config_path = config_path.expanduser().resolve()
    if path is not None and not config_path.exists():
        raise ConfigError(f"config file {config_path} does not exist (create it with `ztai init`)")

    class FileSettings(Settings):
        model_config = SettingsConfigDict(yaml_file=config_path if config_path.exists() else None)

    try:
        settings: Settings = FileSettings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, config_path)) from None
    except (ValueError, OSError, yaml.YAMLError) as exc:  # YAML syntax errors, unreadable file
        raise ConfigError(f"cannot read {config_path}: {exc}") from None
    settings.config_dir = config_path.parent
    return settings


def _describe(exc: ValidationError, config_path: Path) -> str:
    problems = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "(root)"
        problems.append(f"  {key}: {error['msg']}")
    return f"invalid configuration ({config_path} and ZTAI_* variables):\n" + "\n".join(problems)


def with_upstreams(settings: Settings, extra: dict[str, dict[str, Any]]) -> Settings:
    """A copy of `settings` with more upstreams (e.g. from `ztai serve --upstream NAME=URL`)."""
    if not extra:
        return settings
    try:
        added = {name: UpstreamSettings(**values) for name, values in extra.items()}
    except ValidationError as exc:
        raise ConfigError(_describe(exc, Path("--upstream"))) from None
    merged = settings.model_copy(update={"upstreams": {**settings.upstreams, **added}})
    merged.config_dir = settings.config_dir
    return merged
