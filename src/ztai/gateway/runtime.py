"""Everything a running gateway holds: built once at start, closed at shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import multiprocessing
import signal
from collections.abc import Callable
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ztai.agents.approvals import ApprovalStore
from ztai.agents.guard import AgentGuard
from ztai.agents.session import MemorySessionStore, RedisSessionStore, SessionStore
from ztai.agents.sql_sessions import SqlSessionStore
from ztai.audit import AuditLog, AuditWriter
from ztai.audit.ocsf import OcsfFileExporter
from ztai.audit.witness import WitnessExporter, build_witnesses
from ztai.config import Settings
from ztai.detect.base import Detector
from ztai.detect.canary import CanaryDetector
from ztai.detect.inspector import Inspector, load_detector
from ztai.detect.vault import Scope, SessionVault, VaultKeys, session_name
from ztai.detect.vault_store import SqlVaultStore
from ztai.errors import PolicyError, ZtaiError
from ztai.gateway import metrics, scanning
from ztai.gateway.auth_failures import AuthFailureRecorder
from ztai.gateway.policy_watch import PolicyWatcher
from ztai.gateway.upstream import Upstreams
from ztai.identity import KeyStore, RevocationList, TokenVerifier
from ztai.identity.revocation import RevocationFeed
from ztai.identity.task_tokens import task_claims
from ztai.identity.tokens import Principal
from ztai.policy import Decider, PolicyEngine, model_entities
from ztai.policy.reloads import PolicyReloads
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


def _audit(settings: Settings, database: Database, keys: KeyStore) -> Audit:
    log = AuditLog(database, keys.audit.private_key)
    exporter = OcsfFileExporter(settings.path(settings.audit.ocsf_file)) if settings.audit.ocsf_file else None
    witness = settings.audit.witness
    writer = AuditWriter(
        log,
        batch_max=settings.audit.batch_max_events,
        checkpoint_interval=settings.audit.checkpoint_interval_seconds,
        max_uncovered_seconds=settings.audit.uncovered_bound,
        exporter=exporter,
        witnesses=WitnessExporter(build_witnesses(witness, settings.path), max_pending=witness.max_pending),
        checkpoints_to_ocsf=witness.ocsf,
        tenant=settings.trust_domain,
    )
    finding_key = hashlib.sha256(b"ztai finding hash\0" + keys.audit_secret()).digest()
    return Audit(log=log, writer=writer, finding_key=finding_key)


def _vaults(settings: Settings, database: Database, raw_audit_key: bytes) -> Vaults | None:
    vault = settings.detect.vault
    if not vault.enabled:
        return None
    store = SqlVaultStore(database, ttl_seconds=vault.ttl_seconds, max_entries=vault.max_entries)
    return Vaults(keys=VaultKeys.load(raw_audit_key), store=store, issuer=settings.issuer)


@dataclass(frozen=True, kw_only=True)
class Stores:
    """Where state lives: the SQL store and, when `store.redis_url` is set, Redis."""

    database: Database
    redis: aioredis.Redis | None = None  # the shared client (sessions, readiness); connects lazily


@dataclass(frozen=True, kw_only=True)
class Identity:
    """Who the caller is: signing keys, the revocation list, the token verifier, and the record of
    failed authentications."""

    keys: KeyStore
    revocations: RevocationList
    verifier: TokenVerifier
    failures: AuthFailureRecorder  # failed authentications, audited (rate-limited)


@dataclass(frozen=True, kw_only=True)
class Audit:
    """The tamper-evident log, its group-commit writer, and the key of finding hashes in its records."""

    log: AuditLog
    writer: AuditWriter
    finding_key: bytes


@dataclass(frozen=True, kw_only=True)
class Vaults:
    """Session tokenization vaults (`detect.vault.enabled`): their keys and their tables."""

    keys: VaultKeys
    store: SqlVaultStore
    issuer: str  # task tokens of this issuer name the session of their root task

    def vault_for(self, principal: Principal, session_header: str | None) -> SessionVault:
        """The vault of a request's session (the header, else a task token's root task), or one for
        this request alone when it names no session."""
        task = task_claims(principal, self.issuer)
        session = session_name(session_header, task.root if task is not None else None)
        if session is None:
            return SessionVault()
        return SessionVault(self.store, self.scope(principal, session))

    def scope(self, principal: Principal, session: str) -> Scope:
        """Whose vault `session` is: the principal's; for a task token the subject's together with the
        root actor (the agent holding the root task of its chain)."""
        task = task_claims(principal, self.issuer)
        root_actor = task.actors[-1] if task is not None else ""
        return self.keys.scope(principal.tenant, principal.spiffe_id, session, root_actor)


@dataclass(frozen=True, kw_only=True)
class Inspection:
    """Content inspection: the detectors of each route, the canaries, the session vaults."""

    routes: dict[str, RouteInspectors]  # by action
    canaries: CanaryDetector | None  # shared by the requests' system prompts and the scans
    vaults: Vaults | None  # None: per-request tokenization only

    def vault_for(self, principal: Principal, session_header: str | None) -> SessionVault:
        if self.vaults is None:
            return SessionVault()
        return self.vaults.vault_for(principal, session_header)


@dataclass(kw_only=True)
class Runtime:
    """What a running gateway holds, in a few holders; a stage takes the holder it uses."""

    settings: Settings
    stores: Stores
    identity: Identity
    policy: PolicyEngine
    decider: Decider  # every decision of every route: Cedar, then one durable decision record
    audit: Audit
    inspection: Inspection
    upstreams: Upstreams
    agents: AgentGuard  # tool-call decisions and session taint (ztai.agents)
    approvals: ApprovalStore
    policy_watch: PolicyWatcher  # applies `ztai policy reload` requests to `policy`
    _signal_tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)  # the background loops
    _revocation_feed: RevocationFeed | None = None  # Redis pub/sub of revocations, when configured

    @classmethod
    def build(cls, settings: Settings) -> Runtime:
        """Load keys and policies and open the store; raises ZtaiError with a clear message on failure."""
        database = open_database(
            settings.store_url,
            sqlite_synchronous=settings.store.sqlite_synchronous,
            pool_size=settings.store.pool_size,
        )
        stores = Stores(database=database, redis=_redis_client(settings))
        keys = KeyStore.load(settings.data_path)
        revocations = RevocationList(database, refresh_seconds=settings.identity.revocation_refresh_seconds)
        revocations.refresh()
        upstreams = Upstreams(settings.upstreams)
        reloads = PolicyReloads(database)
        handled = reloads.latest()  # read before the directory: a request made meanwhile is applied
        policy = PolicyEngine(
            settings.policy_path,
            model_entities((model, upstream.name) for model, upstream in upstreams.by_model.items()),
        )
        audit = _audit(settings, database, keys)
        failures = AuthFailureRecorder(
            audit.writer,
            tenant=settings.trust_domain,
            fingerprint_key=audit.finding_key,
            per_window=settings.audit.auth_failures_per_window,
            window_seconds=settings.audit.auth_failure_window_seconds,
        )
        verifier = TokenVerifier(settings, keys, revocations)
        identity = Identity(keys=keys, revocations=revocations, verifier=verifier, failures=failures)
        raw_audit_key = keys.audit_secret()
        # Keyed from keys.json, which every worker and replica shares: any of them knows every canary.
        canary_key = hashlib.sha256(b"ztai canary key\0" + raw_audit_key).digest()
        canaries = CanaryDetector(canary_key) if settings.detect.canaries else None
        inspection = Inspection(
            routes=_route_inspectors(settings, canaries),
            canaries=canaries,
            vaults=_vaults(settings, database, raw_audit_key),
        )
        approvals = ApprovalStore(database)
        decider = Decider(policy, audit.writer.record)
        guard = AgentGuard.build(
            settings,
            decider,
            audit.writer.record,
            audit.finding_key,
            sessions=_session_store(settings, database, stores.redis),
            approvals=approvals,
            canaries=canaries,
        )
        guard.inspector.warm()  # the tool-output detectors too: nothing loads on the first request
        watcher = PolicyWatcher(
            policy,
            reloads,
            audit.writer,
            tenant=settings.trust_domain,
            principal=settings.issuer,
            poll_seconds=settings.policy.reload_poll_seconds,
            redis_url=settings.store.redis_url,
            seen=handled.id if handled is not None else 0,
        )
        return cls(
            settings=settings,
            stores=stores,
            identity=identity,
            policy=policy,
            decider=decider,
            audit=audit,
            inspection=inspection,
            upstreams=upstreams,
            agents=guard,
            approvals=approvals,
            policy_watch=watcher,
        )

    async def start(self) -> None:
        self.audit.writer.start()
        scanning.prefer_event_loop()
        # The scanning worker loads its detectors now, not during the first large request.
        routes = self.inspection.routes.values()
        scanning.warm([d for r in routes for i in (r.input, r.output) if i for d in i.detectors])
        revocations = self.identity.revocations
        self._every(self.settings.identity.revocation_refresh_seconds, revocations.refresh)
        if self.inspection.vaults is not None:
            self._every(self.settings.detect.vault.purge_interval_seconds, self.inspection.vaults.store.purge)
        sessions = self.agents.sessions
        if isinstance(sessions, SqlSessionStore):
            self._every(sessions.purge_interval_seconds, sessions.purge)
        if self.settings.store.redis_url:
            self._revocation_feed = RevocationFeed(revocations, self.settings.store.redis_url)
            self._revocation_feed.start()
        self.policy_watch.start()
        self._tasks.append(asyncio.create_task(self._flush_auth_failures()))
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            if multiprocessing.parent_process() is not None:
                # A worker under ztai's supervisor: SIGHUP is the supervisor's (a hangup of the process
                # group must not make every worker request a reload of its own, nor end it).
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
            else:
                # A single-process server: SIGHUP reloads the policies in place (validated, recorded as
                # a request, applied without a restart).
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._reload_on_signal)
        # Models, rules and policies loaded at start live as long as the process: out of the collector's
        # reach, a full collection no longer walks them (a pause of every request on the loop).
        gc.collect()
        gc.freeze()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.identity.failures.close()  # the summaries of open windows, before the writer stops
        if self._revocation_feed is not None:
            await self._revocation_feed.close()
        await self.policy_watch.close()
        await self.upstreams.close()
        await self.agents.sessions.close()
        if self.stores.redis is not None:
            with contextlib.suppress(RedisError, OSError):
                await self.stores.redis.aclose()  # idempotent: the Redis session store may have closed it
        await asyncio.to_thread(self.audit.writer.stop)
        self.stores.database.close()

    def _reload_on_signal(self) -> None:
        task = asyncio.ensure_future(self.policy_watch.request_local("SIGHUP"))
        self._signal_tasks.add(task)
        task.add_done_callback(self._signal_tasks.discard)

    def reload_policies(self) -> None:
        """Reload this process's policies at once (in-process callers and tests; a running server
        reloads through `ztai policy reload` or SIGHUP, which every worker applies)."""
        previous = self.policy.revision
        try:
            bundle = self.policy.reload()
        except PolicyError as exc:
            log.error("policy reload rejected, previous policies stay active: %s", exc.message)
            return
        metrics.set_policy_revision(bundle.revision, previous)
        log.info("policies reloaded: revision %s (%d files)", bundle.revision, len(bundle.files))

    def _every(self, seconds: float, work: Callable[[], object]) -> None:
        """Run the blocking `work` every `seconds` off the loop, logging (not raising) its failures."""

        async def loop() -> None:
            while True:
                await asyncio.sleep(seconds)
                try:
                    await asyncio.to_thread(work)
                except ZtaiError as exc:
                    log.warning("%s", exc.message)

        self._tasks.append(asyncio.create_task(loop()))

    async def _flush_auth_failures(self) -> None:
        while True:
            await asyncio.sleep(self.identity.failures.window_seconds)
            self.identity.failures.flush()
