"""Task tokens: the claims an RFC 8693 token exchange adds, and reading them back from a verified token.

A task token is one of ztai's own tokens whose `sub` is the subject the task runs for (a user or a
service) and whose `act` claim is the delegation chain (RFC 8693 §4.1: the current actor outermost, each
earlier actor nested inside). It also carries:

- `task`: this task's id; `task_chain`: the ids from the root task down to this one (revoking any of them
  revokes this token);
- the grant (`ztai.agents.grants.TaskGrant`): `tools`, `constraints`, `egress`, `budget`.

Only ztai's own issuer can mint these claims (they are reserved in `issue_token`'s custom claims), and a
token from any other issuer that carries them is not a task token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ztai.errors import AuthenticationError
from ztai.identity.grants import TaskGrant
from ztai.identity.spiffe_ids import parse_spiffe_id
from ztai.identity.tokens import Principal

TASK_CLAIMS = frozenset({"task", "task_chain", "act", "constraints", "egress", "budget"})
TASK_ID = re.compile(r"^tsk_[0-9a-f]{8,64}$")


@dataclass(frozen=True, slots=True)
class TaskClaims:
    """The task part of a verified task token."""

    task_id: str
    chain: tuple[str, ...]  # root task first, this task last
    subject: str  # on whose behalf (the token's sub)
    actors: tuple[str, ...]  # the act chain, current actor first
    grant: TaskGrant

    @property
    def actor(self) -> str:
        return self.actors[0]

    @property
    def depth(self) -> int:
        return len(self.actors)

    @property
    def root(self) -> str:
        return self.chain[0]

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
    return TaskClaims(task_id, tuple(chain), principal.spiffe_id, actors, TaskGrant.from_claims(claims))
