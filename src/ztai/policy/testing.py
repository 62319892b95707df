"""`ztai policy test FILE`: run a YAML file of request -> expected-decision cases against the policies."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ztai.errors import PolicyError
from ztai.identity.spiffe_ids import parse_spiffe_id
from ztai.policy.context import merge_context, principal_request
from ztai.policy.decision import Decision
from ztai.policy.engine import PolicyEngine

EFFECTS = ("allow", "deny", "step_up", "require_approval", "allow_with_obligations")


@dataclass(frozen=True)
class CaseResult:
    name: str
    passed: bool
    expected: str
    decision: Decision
    problem: str = ""


def load_cases(path: Path) -> list[dict[str, Any]]:
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise PolicyError(f"cannot read {path}: {exc}") from None
    cases = document.get("cases") if isinstance(document, dict) else None
    if not isinstance(cases, list) or not cases:
        raise PolicyError(f"{path}: expected a top-level `cases:` list")
    for number, case in enumerate(cases, 1):
        if not isinstance(case, dict) or not {"principal", "action", "resource", "expect"} <= case.keys():
            raise PolicyError(f"{path}: case {number} needs principal, action, resource and expect")
        if case["expect"] not in EFFECTS:
            raise PolicyError(f"{path}: case {number}: expect must be one of {', '.join(EFFECTS)}")
    return cases


def run_case(engine: PolicyEngine, case: dict[str, Any]) -> CaseResult:
    name = str(case.get("name") or f"{case['principal']} {case['action']} {case['resource']}")
    workload = parse_spiffe_id(str(case["principal"]))
    resource = case["resource"]
    resource_type, resource_id = (
        (resource["type"], resource["id"]) if isinstance(resource, dict) else ("Model", str(resource))
    )
    overrides = {
        "tenant": workload.trust_domain,
        "principal_kind": workload.kind,
        **(case.get("context") or {}),
    }
    request = principal_request(
        workload.uri, workload.kind, str(case["action"]), resource_type, resource_id, merge_context(overrides)
    )
    decision = engine.decide(request)
    problem = ""
    if decision.effect != case["expect"]:
        problem = f"expected {case['expect']}, got {decision.effect} ({', '.join(decision.reasons)})"
    elif "reasons" in case and sorted(case["reasons"]) != sorted(decision.reasons):
        problem = f"expected reasons {case['reasons']}, got {decision.reasons}"
    return CaseResult(name, not problem, str(case["expect"]), decision, problem)


def run_file(engine: PolicyEngine, path: Path) -> list[CaseResult]:
    return [run_case(engine, case) for case in load_cases(path)]
