"""Task tokens: the claims an RFC 8693 token exchange adds, and reading them back from a verified token.

A task token is one of ztai's own tokens whose `sub` is the subject the task runs for (a user or a
service) and whose `act` claim is the delegation chain (RFC 8693 §4.1: the current actor outermost, each
earlier actor nested inside). It also carries:

- `task`: this task's id; `task_chain`: the ids from the root task down to this one (revoking any of them
  revokes this token);
- the grant (`ztai.agents.grants.TaskGrant`): `tools`, `constraints`, `egress`, `budget`;
- `ancestor_budgets`: the budgets of the tasks above this one (root first, one per `task_chain` entry
  before this task's own). A parent's budget bounds the sum over all its descendants, so every call is
  counted against each of them. Sub-task tokens issued before this claim existed lack it: each ancestor
  is then held to this task's own budget, never looser than its real one (a sub-task's budget is at most
  its parent's).

Only ztai's own issuer can mint these claims (they are reserved in `issue_token`'s custom claims), and a
token from any other issuer that carries them is not a task token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ztai.errors import AuthenticationError
from ztai.identity.grants import BUDGET_KINDS, TaskGrant
from ztai.identity.spiffe_ids import parse_spiffe_id
from ztai.identity.tokens import TASK_CLAIM_NAMES, Principal

TASK_CLAIMS = TASK_CLAIM_NAMES
TASK_ID = re.compile(r"^tsk_[0-9a-f]{8,64}$")


@dataclass(frozen=True, slots=True)
class TaskClaims:
    """The task part of a verified task token."""

    task_id: str
    chain: tuple[str, ...]  # root task first, this task last
    subject: str  # on whose behalf (the token's sub)
    actors: tuple[str, ...]  # the act chain, current actor first
    grant: TaskGrant
    ancestor_budgets: tuple[dict[str, int], ...] = ()  # the budgets of chain[:-1], root first

    @property
    def actor(self) -> str:
        return self.actors[0]

    @property
    def depth(self) -> int:
        return len(self.actors)

    @property
    def root(self) -> str:
        return self.chain[0]

    def chain_limits(self, kind: str) -> tuple[tuple[str, int | None], ...]:
        """(task id, its `kind` budget or None) for every task of the chain, root first."""
        budgets = (*self.ancestor_budgets, self.grant.budget)
        return tuple((task, budget.get(kind)) for task, budget in zip(self.chain, budgets, strict=True))

    def context(self) -> dict[str, Any]:
        """`context.delegation` for a request made within this task."""
        return {
            "task": self.task_id,
            "depth": self.depth,
            "subject": self.subject,
            "actor": self.actor,
            "actors": list(self.actors),
        }


def act_claim(actors: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """The nested RFC 8693 `act` claim for `actors` (current actor first)."""
    claim: dict[str, Any] = {"sub": actors[-1]}
    for actor in reversed(actors[:-1]):
        claim = {"sub": actor, "act": claim}
    return claim


def act_chain(claim: Any, max_depth: int = 16) -> tuple[str, ...]:
    """The actors of a nested `act` claim, current actor first. Raises AuthenticationError if malformed."""
    actors: list[str] = []
    node = claim
    while node is not None:
        if not isinstance(node, dict) or not isinstance(node.get("sub"), str) or len(actors) >= max_depth:
            raise AuthenticationError("malformed act claim", code="invalid_token")
        actors.append(parse_spiffe_id(node["sub"]).uri)
        node = node.get("act")
    return tuple(actors)


def task_claims(principal: Principal, own_issuer: str) -> TaskClaims | None:
    """The task of `principal`'s token, or None when it is not a ztai task token."""
    claims = principal.claims
    if "task" not in claims or principal.issuer != own_issuer:
        return None
    task_id, chain = claims.get("task"), claims.get("task_chain")
    if not isinstance(task_id, str) or not TASK_ID.match(task_id):
        raise AuthenticationError("malformed task claim", code="invalid_token")
    if not isinstance(chain, list) or not chain or chain[-1] != task_id:
        raise AuthenticationError("malformed task_chain claim", code="invalid_token")
    if not all(isinstance(t, str) and TASK_ID.match(t) for t in chain):
        raise AuthenticationError("malformed task_chain claim", code="invalid_token")
    actors = act_chain(claims.get("act"))
    if len(actors) != len(chain):
        raise AuthenticationError("act chain and task chain disagree", code="invalid_token")
    grant = TaskGrant.from_claims(claims)
    ancestors = _ancestor_budgets(claims.get("ancestor_budgets"), len(chain) - 1, grant)
    return TaskClaims(task_id, tuple(chain), principal.spiffe_id, actors, grant, ancestors)


def _ancestor_budgets(claim: Any, count: int, grant: TaskGrant) -> tuple[dict[str, int], ...]:
    if claim is None:  # a token from before the claim: this task's budget bounds every ancestor
        return tuple(dict(grant.budget) for _ in range(count))
    if not isinstance(claim, list) or len(claim) != count:
        raise AuthenticationError("malformed ancestor_budgets claim", code="invalid_token")
    budgets = []
    for budget in claim:
        if not isinstance(budget, dict) or set(budget) - set(BUDGET_KINDS):
            raise AuthenticationError("malformed ancestor_budgets claim", code="invalid_token")
        if not all(type(v) is int and v > 0 for v in budget.values()):
            raise AuthenticationError("malformed ancestor_budgets claim", code="invalid_token")
        budgets.append(dict(budget))
    return tuple(budgets)
