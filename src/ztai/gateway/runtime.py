"""Everything a running gateway holds: built once at start, closed at shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import signal
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ztai.agents.approvals import ApprovalStore
from ztai.agents.guard import AgentGuard
from ztai.agents.session import MemorySessionStore, RedisSessionStore, SessionStore
from ztai.agents.sql_sessions import SqlSessionStore
from ztai.audit import AuditLog, AuditWriter
from ztai.audit.ocsf import OcsfFileExporter
from ztai.config import Settings
from ztai.detect.base import Detector
from ztai.detect.canary import CanaryDetector
from ztai.detect.inspector import Inspector, load_detector
from ztai.detect.vault import Scope, SessionVault, VaultKeys, session_name
from ztai.detect.vault_store import SqlVaultStore
from ztai.errors import PolicyError, ZtaiError
from ztai.gateway import scanning
from ztai.gateway.upstream import Upstreams
from ztai.identity import KeyStore, RevocationList, TokenVerifier
from ztai.identity.revocation import RevocationFeed
from ztai.identity.task_tokens import task_claims
from ztai.identity.tokens import Principal
from ztai.policy import Decider, PolicyEngine, model_entities
from ztai.store import Database, open_database
from ztai.store.shared import async_client

log = logging.getLogger("ztai.gateway")


@dataclass(frozen=True)
class RouteInspectors:
    input: Inspector | None
    output: Inspector | None
    holdback: int
    max_input_chars: int  # all the texts of one request together; more is refused (413)


def _route_inspectors(settings: Settings, canaries: CanaryDetector | None) -> dict[str, RouteInspectors]:
    detect = settings.detect
    routes = {"chat": detect.chat, "embed": detect.embeddings}
    extra: list[Detector] = [canaries] if canaries is not None else []

    options = {"pii": detect.pii.model_dump()}
    loaded: dict[str, Detector] = {}  # one instance per detector, shared by the routes

    def inspector(names: list[str]) -> Inspector | None:
        detectors = [
            loaded.get(name) or loaded.setdefault(name, load_detector(name, options.get(name)))
            for name in names
            if name != "canary"
        ] + extra
        if not detectors:
            return None
        found = Inspector(
            [],
            detectors=detectors,
            cache_entries=detect.scan_cache_entries,
            cache_chars=detect.scan_cache_chars,
        )
        found.warm()  # models load at start, not on the first request
        return found

    return {
        action: RouteInspectors(
            inspector(route.input),
            inspector(route.output),
            detect.stream_holdback_chars,
            route.max_input_chars,
        )
        for action, route in routes.items()
    }


def _session_store(settings: Settings, database: Database, redis: aioredis.Redis | None) -> SessionStore:
    """Agent sessions where `agents.session_store` says: Redis or the SQL store (shared by workers and
    replicas), or this process."""
    agents = settings.agents
    backend = settings.session_backend()
    if backend == "redis":
        assert redis is not None  # the settings refuse session_store redis without store.redis_url
        return RedisSessionStore(
            redis,
            ttl_seconds=agents.session_ttl_seconds,
            max_values=agents.max_session_values,
            count_ttl_seconds=agents.max_task_ttl_seconds,
        )
    if backend == "sql":
        return SqlSessionStore(
            database,
            ttl_seconds=agents.session_ttl_seconds,
            max_values=agents.max_session_values,
            count_ttl_seconds=agents.max_task_ttl_seconds,
        )
    return MemorySessionStore(
        ttl_seconds=agents.session_ttl_seconds,
        max_values=agents.max_session_values,
        count_ttl_seconds=agents.max_task_ttl_seconds,
    )


def _redis_client(settings: Settings) -> aioredis.Redis | None:
    """The client of `store.redis_url` (connects lazily), with the configured timeouts; None unset."""
    if not settings.store.redis_url:
        return None
    return async_client(settings.store.redis_url, settings.store.redis_timeout_seconds)


@dataclass
class Runtime:
    settings: Settings
    database: Database
    keys: KeyStore
    revocations: RevocationList
    verifier: TokenVerifier
    policy: PolicyEngine
    decider: Decider  # every decision of every route: Cedar, then one durable decision record
    audit_log: AuditLog
    audit: AuditWriter
    upstreams: Upstreams
    inspectors: dict[str, RouteInspectors]  # by action
    finding_key: bytes  # keys the hashes of finding values in audit records
    canaries: CanaryDetector | None  # shared by the requests' system prompts and the scans
    agents: AgentGuard | None = None  # tool-call decisions and session taint (ztai.agents)
    approvals: ApprovalStore | None = None
    vault_keys: VaultKeys | None = None  # session tokenization vaults (None: per-request vaults only)
    vault_store: SqlVaultStore | None = None
    _refresher: asyncio.Task[None] | None = None
    _vault_purger: asyncio.Task[None] | None = None
    _session_purger: asyncio.Task[None] | None = None
    _revocation_feed: RevocationFeed | None = None  # Redis pub/sub of revocations, when configured
    redis: aioredis.Redis | None = None  # the shared client of `store.redis_url` (sessions, readiness)

    @classmethod
    def build(cls, settings: Settings) -> Runtime:
        """Load keys and policies and open the store; raises ZtaiError with a clear message on failure."""
        database = open_database(
            settings.store_url,
            sqlite_synchronous=settings.store.sqlite_synchronous,
            pool_size=settings.store.pool_size,
        )
        keys = KeyStore.load(settings.data_path)
        revocations = RevocationList(database, refresh_seconds=settings.identity.revocation_refresh_seconds)
        revocations.refresh()
        upstreams = Upstreams(settings.upstreams)
        policy = PolicyEngine(
            settings.policy_path,
            model_entities((model, upstream.name) for model, upstream in upstreams.by_model.items()),
        )
        audit_log = AuditLog(database, keys.audit.private_key)
        exporter = (
            OcsfFileExporter(settings.path(settings.audit.ocsf_file)) if settings.audit.ocsf_file else None
        )
        audit = AuditWriter(
            audit_log,
            batch_max=settings.audit.batch_max_events,
            checkpoint_interval=settings.audit.checkpoint_interval_seconds,
            exporter=exporter,
        )
        verifier = TokenVerifier(settings, keys, revocations)
        raw_audit_key = keys.audit_secret()
        # Keyed from keys.json, which every worker and replica shares: any of them knows every canary.
        canary_key = hashlib.sha256(b"ztai canary key\0" + raw_audit_key).digest()
        canaries = CanaryDetector(canary_key) if settings.detect.canaries else None
        finding_key = hashlib.sha256(b"ztai finding hash\0" + raw_audit_key).digest()
        approvals = ApprovalStore(database)
        redis = _redis_client(settings)
        vault = settings.detect.vault
        vault_keys = VaultKeys.load(raw_audit_key) if vault.enabled else None
        vault_store = (
            SqlVaultStore(database, ttl_seconds=vault.ttl_seconds, max_entries=vault.max_entries)
            if vault.enabled
            else None
        )
        decider = Decider(policy, audit.record)
        guard = AgentGuard.build(
            settings,
            decider,
            audit.record,
            finding_key,
            sessions=_session_store(settings, database, redis),
            approvals=approvals,
            canaries=canaries,
        )
        guard.inspector.warm()  # the tool-output detectors too: nothing loads on the first request
        return cls(
            settings,
            database,
            keys,
            revocations,
            verifier,
            policy,
            decider,
            audit_log,
            audit,
            upstreams,
            _route_inspectors(settings, canaries),
            finding_key,
            canaries,
            guard,
            approvals,
            vault_keys,
            vault_store,
            redis=redis,
        )

    async def start(self) -> None:
        self.audit.start()
        scanning.prefer_event_loop()
        # The scanning worker loads its detectors now, not during the first large request.
        scanning.warm(
            [d for r in self.inspectors.values() for i in (r.input, r.output) if i for d in i.detectors]
        )
        self._refresher = asyncio.create_task(self._refresh_revocations())
        if self.vault_store is not None:
            self._vault_purger = asyncio.create_task(self._purge_vaults(self.vault_store))
        sessions = self.agents.sessions if self.agents is not None else None
        if isinstance(sessions, SqlSessionStore):
            self._session_purger = asyncio.create_task(self._purge_sessions(sessions))
        if self.settings.store.redis_url:
            self._revocation_feed = RevocationFeed(self.revocations, self.settings.store.redis_url)
            self._revocation_feed.start()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.reload_policies)
        # Models, rules and policies loaded at start live as long as the process: out of the collector's
        # reach, a full collection no longer walks them (a pause of every request on the loop).
        gc.collect()
        gc.freeze()

    async def close(self) -> None:
        for task in (self._refresher, self._vault_purger, self._session_purger):
            if task is not None:
                task.cancel()
        if self._revocation_feed is not None:
            await self._revocation_feed.close()
        await self.upstreams.close()
        if self.agents is not None:
            await self.agents.sessions.close()
        if self.redis is not None:
            with contextlib.suppress(RedisError, OSError):
                await self.redis.aclose()  # idempotent: the Redis session store may have closed it
        await asyncio.to_thread(self.audit.stop)
        self.database.close()

    def reload_policies(self) -> None:
        try:
            bundle = self.policy.reload()
        except PolicyError as exc:
            log.error("policy reload rejected, previous policies stay active: %s", exc.message)
            return
        log.info("policies reloaded: revision %s (%d files)", bundle.revision, len(bundle.files))

    def vault_for(self, principal: Principal, session_header: str | None) -> SessionVault:
        """The tokenization vault of a request: its session's (the header, else a task token's root
        task) when session vaults are on, else one for this request alone."""
        task = task_claims(principal, self.settings.issuer)
        session = session_name(session_header, task.root if task is not None else None)
        if session is None or self.vault_keys is None or self.vault_store is None:
            return SessionVault()
        return SessionVault(self.vault_store, self.vault_scope(self.vault_keys, principal, session))

    def vault_scope(self, keys: VaultKeys, principal: Principal, session: str) -> Scope:
        """Whose vault `session` is: the principal's; for a task token the subject's together with the
        root actor (the agent holding the root task of its chain)."""
        task = task_claims(principal, self.settings.issuer)
        root_actor = task.actors[-1] if task is not None else ""
        return keys.scope(principal.tenant, principal.spiffe_id, session, root_actor)

    async def _purge_vaults(self, store: SqlVaultStore) -> None:
        while True:
            await asyncio.sleep(self.settings.detect.vault.purge_interval_seconds)
            try:
                await asyncio.to_thread(store.purge)
            except ZtaiError as exc:
                log.warning("%s", exc.message)

    async def _purge_sessions(self, store: SqlSessionStore) -> None:
        while True:
            await asyncio.sleep(store.purge_interval_seconds)
            try:
                await asyncio.to_thread(store.purge)
            except ZtaiError as exc:
                log.warning("%s", exc.message)

    async def _refresh_revocations(self) -> None:
        interval = self.settings.identity.revocation_refresh_seconds
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.to_thread(self.revocations.refresh)
            except ZtaiError as exc:
                log.warning("%s", exc.message)
