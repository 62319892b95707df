"""Policy evaluation with Cedar: parse once, decide many times, explain every decision.

Policies are `*.cedar` files in one directory. A load parses and validates all of them against the
schema; a reload that fails leaves the previous set active. Annotations give ztai's extra vocabulary:
`@id("...")` names a policy in reasons, `@effect("step_up")` or `@effect("require_approval")` on a forbid
turns its denial into a step-up or a hold for human approval, and `@obligation("...")` on a permit adds an
obligation to the allow (`@obligation("require_approval")` holds the call, like the forbid form).

A soft forbid (`@effect`) only softens what some permit allows: it never turns a default deny into a
step-up or a hold, so no approval can release a request that no permit covers. To decide that in one Cedar
evaluation, the parsed set holds each soft forbid as a permit with the same scope and conditions, and
`_explain` tells the two kinds of satisfied permits apart by id.

Every request's context is validated against the schema by Cedar (the schema is passed to
`is_authorized`): a missing, misspelt or mistyped attribute denies (`invalid-context`) and is logged. The
shape of a context (its attribute names and value types) is what validation depends on, so each shape
that passed is remembered per bundle and later requests of that shape are decided on the projected
context alone (validation of a full context would cost about as much again as the decision).
`context.input` (a tool call's arguments, of any shape) is validated as the empty record the schema
declares and given to Cedar only when a policy reads it.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cedarpy
import orjson

from ztai.errors import PolicyError
from ztai.policy.decision import Decision, Effect

log = logging.getLogger("ztai.policy")

SCHEMA_PATH = Path(__file__).parent / "schema.cedarschema"
DEFAULTS_DIR = Path(__file__).parent / "defaults"
DEFAULT_DENY = "default-deny"
INVALID_CONTEXT = "invalid-context"
MAX_SHAPES = 4096  # validated context shapes remembered per bundle

# Effects a forbid may carry (`@effect(...)`) instead of a flat denial, weakest first: when several
# forbids match, a plain one denies, else the strongest of these wins.
SOFT_EFFECTS: tuple[Effect, ...] = ("step_up", "require_approval")
ENTITY_TYPES = {"user": "User", "agent": "Agent", "service": "Service", "model": "Model"}


@dataclass(frozen=True, slots=True)
class Request:
    """principal asks to perform action on resource in context."""

    principal_type: str
    principal_id: str
    action: str
    resource_type: str
    resource_id: str
    context: dict[str, Any]

    def to_cedar(
        self, context_keys: frozenset[str] | None = None, *, for_schema: bool = False
    ) -> dict[str, Any]:
        """The request in cedarpy's form; `context_keys` limits the context to what policies read.
        `for_schema`: the whole context with `input` as the empty record the schema declares."""
        context = self.context
        if for_schema:
            context = {**context, "input": {}} if "input" in context else context
        elif context_keys is not None:
            context = {key: value for key, value in context.items() if key in context_keys}
        return {
            "principal": {"type": self.principal_type, "id": self.principal_id},
            "action": {"type": "Action", "id": self.action},
            "resource": {"type": self.resource_type, "id": self.resource_id},
            # Serialised here with orjson: cheaper than letting cedarpy use the stdlib json module.
            "context": orjson.dumps(context).decode(),
        }


@dataclass(frozen=True)
class PolicyBundle:
    """One validated, parsed generation of policies, schema and static entities."""

    policies: Any  # cedarpy.PolicySet
    entities: Any  # cedarpy.Entities
    names: dict[str, str]  # parser id (policy0...) -> display id (@id or file:index)
    annotations: dict[str, dict[str, str]]
    revision: str
    files: list[str]
    # The top-level context attributes any policy reads (None: some policy uses `context` as a whole).
    # Cedar's cost grows with the context it parses, and its result can depend only on these.
    context_keys: frozenset[str] | None = None
    # Parser ids of the soft forbids, which `policies` holds as permits (see the module docstring).
    soft: frozenset[str] = frozenset()
    schema: Any = None  # cedarpy.Schema
    schema_revision: str = ""  # digest of the schema alone: recorded decisions name it (what-if replay)
    # Shapes of requests whose context passed validation (see the module docstring).
    valid_shapes: set[tuple[Any, ...]] = field(default_factory=set, compare=False)


def load_bundle(policy_dir: Path, extra_entities: list[dict[str, Any]] | None = None) -> PolicyBundle:
    """Read, validate and parse every `*.cedar` file in `policy_dir`. Raises PolicyError."""
    files = sorted(policy_dir.glob("*.cedar"))
    if not files:
        raise PolicyError(f"no *.cedar policy files in {policy_dir}")
    try:
        sources = {path.name: path.read_text() for path in files}
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"cannot read the policies in {policy_dir}: {exc}") from None
    return bundle_from_sources(sources, extra_entities)


def bundle_from_sources(
    sources: dict[str, str], extra_entities: list[dict[str, Any]] | None = None
) -> PolicyBundle:
    """Validate and parse policies given as {file name: Cedar text} (the files of one directory)."""
    if not sources:
        raise PolicyError("no policies given")
    schema_text = SCHEMA_PATH.read_text()
    texts: list[str] = []
    names: dict[str, str] = {}
    annotations: dict[str, dict[str, str]] = {}
    evaluated: dict[str, Any] = {}  # parser id -> policy (Cedar JSON), soft forbids turned permits
    context_keys: set[str] | None = set()
    digest = hashlib.sha256(schema_text.encode())
    for name in sorted(sources):
        text = sources[name]
        digest.update(name.encode() + b"\0" + text.encode() + b"\0")
        try:
            parsed = orjson.loads(cedarpy.policies_to_json_str(text))
        except ValueError as exc:
            raise PolicyError(f"{name}: {exc}") from None
        for index, (_, policy) in enumerate(parsed["staticPolicies"].items()):
            generated = f"policy{len(names)}"
            notes = dict(policy.get("annotations") or {})
            names[generated] = notes.get("id") or f"{Path(name).stem}:{index}"
            annotations[generated] = notes
            evaluated[generated] = _as_evaluated(policy, f"{name}: {names[generated]}")
            read = _context_attributes(policy)
            context_keys = None if read is None or context_keys is None else context_keys | read
        texts.append(text)
    combined = "\n".join(texts)
    validation = cedarpy.validate_policies(combined, schema_text)
    if not validation.validation_passed:
        problems = "; ".join(f"{names.get(e.policy_id, e.policy_id)}: {e.error}" for e in validation.errors)
        raise PolicyError(f"policies failed validation: {problems}")
    duplicates = {n for n in names.values() if list(names.values()).count(n) > 1}
    if duplicates:
        raise PolicyError(f"duplicate policy ids: {', '.join(sorted(duplicates))}")
    try:
        policies = cedarpy.PolicySet.from_json_str(
            orjson.dumps({"staticPolicies": evaluated, "templates": {}, "templateLinks": []}).decode()
        )
        entities = cedarpy.Entities.from_json_str(orjson.dumps(extra_entities or []).decode(), schema_text)
        schema = cedarpy.Schema.from_str(schema_text)
    except ValueError as exc:
        raise PolicyError(str(exc)) from None
    return PolicyBundle(
        policies,
        entities,
        names,
        annotations,
        digest.hexdigest()[:16],
        sorted(sources),
        frozenset(context_keys) if context_keys is not None else None,
        frozenset(key for key, policy in evaluated.items() if _is_soft(policy)),
        schema,
        schema_revision(schema_text),
    )


def schema_revision(schema_text: str | None = None) -> str:
    """The digest naming a schema (the packaged one by default)."""
    text = SCHEMA_PATH.read_text() if schema_text is None else schema_text
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _is_soft(policy: dict[str, Any]) -> bool:
    """A forbid whose `@effect` softens its denial (to step-up or a hold)."""
    return (policy.get("annotations") or {}).get("effect") in SOFT_EFFECTS


def _as_evaluated(policy: dict[str, Any], where: str) -> dict[str, Any]:
    """The policy as the bundle evaluates it: a soft forbid becomes a permit of the same scope and
    conditions, so Cedar reports it among the satisfied permits instead of denying."""
    if policy.get("effect") == "forbid" and _is_soft(policy):
        return {**policy, "effect": "permit"}
    if policy.get("effect") == "permit" and _is_soft(policy):
        # `@effect` belongs on forbids; on a permit it would be mistaken for a soft forbid.
        raise PolicyError(f"{where}: @effect is only allowed on a forbid (a permit takes @obligation)")
    return policy


def _context_attributes(node: Any) -> set[str] | None:
    """Top-level context attributes a policy (Cedar JSON form) reads with `.attr` or `has attr`.

    None when it uses `context` in any other way (compares or passes the whole record).
    """
    found: set[str] = set()

    def walk(item: Any) -> bool:
        if isinstance(item, dict):
            for operator in (".", "has"):
                access = item.get(operator)
                if isinstance(access, dict) and access.get("left") == {"Var": "context"}:
                    if not isinstance(access.get("attr"), str):
                        return False
                    found.add(access["attr"])
                    return True
            if item.get("Var") == "context":
                return False
            return all(walk(value) for value in item.values())
        if isinstance(item, list):
            return all(walk(value) for value in item)
        return True

    return found if walk(node) else None


class PolicyEngine:
    """Decides requests against the active bundle; `reload()` swaps bundles atomically."""

    def __init__(self, policy_dir: Path, static_entities: list[dict[str, Any]] | None = None) -> None:
        self.policy_dir = policy_dir
        self._static_entities = static_entities or []
        self._lock = threading.Lock()
        self.bundle = load_bundle(policy_dir, self._static_entities)

    @property
    def revision(self) -> str:
        return self.bundle.revision

    def load(self) -> PolicyBundle:
        """Read, validate and parse the directory into a new bundle; the active one is untouched."""
        return load_bundle(self.policy_dir, self._static_entities)

    def activate(self, bundle: PolicyBundle) -> None:
        """Make `bundle` the active set: one reference swap, so a decision sees the old set or the new
        one, never a mixture (each decision reads `self.bundle` once)."""
        self.bundle = bundle

    def reload(self) -> PolicyBundle:
        """Load the directory again; on any error the old bundle stays active and PolicyError is raised."""
        with self._lock:
            bundle = self.load()
            self.activate(bundle)
            return bundle

    def decide(self, request: Request) -> Decision:
        """Validate the request against the schema and decide it (no I/O; never raises for a request)."""
        return decide_with(self.bundle, request)

    def decide_many(self, requests: list[Request]) -> list[Decision]:
        bundle = self.bundle
        problems = [_invalid(bundle, request) for request in requests]
        valid = [request for request, problem in zip(requests, problems, strict=True) if problem is None]
        results = iter(
            cedarpy.is_authorized_batch(
                [r.to_cedar(bundle.context_keys) for r in valid], bundle.policies, bundle.entities
            )
        )
        return [
            _explain(next(results), bundle) if problem is None else _refused(bundle, problem)
            for problem in problems
        ]


def decide_with(bundle: PolicyBundle, request: Request) -> Decision:
    """One request decided by one bundle: validated (schema), then evaluated on the projected context."""
    problem = _invalid(bundle, request)
    if problem is not None:
        return _refused(bundle, problem)
    result = cedarpy.is_authorized(request.to_cedar(bundle.context_keys), bundle.policies, bundle.entities)
    return _explain(result, bundle)


def _invalid(bundle: PolicyBundle, request: Request) -> str | None:
    """Why the request does not match the schema (Cedar validates it), or None. Shapes that passed are
    remembered, so this costs one Cedar call per new shape."""
    shape = _request_shape(request)
    if shape is not None and shape in bundle.valid_shapes:
        return None
    result = cedarpy.is_authorized(
        request.to_cedar(for_schema=True), bundle.policies, bundle.entities, bundle.schema
    )
    invalid = [e for e in result.diagnostics.errors if e.startswith("failed to build request")]
    if shape is None and not invalid:
        invalid = ["context.input must be a record"]
    if invalid:
        return invalid[0]
    if shape is not None and len(bundle.valid_shapes) < MAX_SHAPES:
        bundle.valid_shapes.add(shape)
    return None


def _refused(bundle: PolicyBundle, problem: str) -> Decision:
    # A context ztai built wrongly is a bug: deny (fail closed) and say so loudly.
    log.error("policy request does not match the schema, denied: %s", problem[:500])
    return Decision("deny", [INVALID_CONTEXT], [problem], [], bundle.revision)


def _request_shape(request: Request) -> tuple[Any, ...] | None:
    """What schema validation depends on: entity types, action, attribute names and value types."""
    context = request.context
    if not isinstance(context.get("input", {}), dict):
        return None
    attributes = tuple([(k, _shape(v) if k != "input" else dict) for k, v in context.items()])
    return (request.principal_type, request.action, request.resource_type, attributes)


def _shape(value: Any) -> Any:
    kind = type(value)
    if kind is dict:
        return tuple([(key, _shape(item)) for key, item in value.items()])
    if kind is list:
        return (list, *{_shape(item) for item in value})
    return kind


def _explain(result: Any, bundle: PolicyBundle) -> Decision:
    diagnostics = result.diagnostics
    reasons = [bundle.names.get(r, r) for r in diagnostics.reasons]
    errors = list(diagnostics.errors)
    if errors:
        # Cedar skips a policy that errors, which could drop a forbid: fail closed instead.
        return Decision("deny", reasons or ["policy-evaluation-error"], errors, [], bundle.revision)
    if not result.allowed:  # a plain forbid matched, or nothing did
        return Decision("deny", reasons or [DEFAULT_DENY], [], [], bundle.revision)
    soft = [r for r in diagnostics.reasons if r in bundle.soft]
    permits = [r for r in diagnostics.reasons if r not in bundle.soft]
    if not permits:  # only soft forbids matched: they soften a permit, and there is none
        return Decision("deny", [*_named(soft, bundle), DEFAULT_DENY], [], [], bundle.revision)
    if soft:
        strongest = max((bundle.annotations[r]["effect"] for r in soft), key=SOFT_EFFECTS.index)
        return Decision(strongest, _named(soft, bundle), [], [], bundle.revision)  # type: ignore[arg-type]
    obligations = sorted(
        {bundle.annotations[r]["obligation"] for r in permits if "obligation" in bundle.annotations[r]}
    )
    effect: Effect = "allow_with_obligations" if obligations else "allow"
    if "require_approval" in obligations:
        effect = "require_approval"
    return Decision(effect, reasons, [], obligations, bundle.revision)


def _named(ids: list[str], bundle: PolicyBundle) -> list[str]:
    return [bundle.names.get(r, r) for r in ids]
