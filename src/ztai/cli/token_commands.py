"""`ztai token issue|revoke` and `ztai keys rotate`. Every issuance and revocation is audited."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ztai.audit.events import identity_event
from ztai.cli.common import ConfigOption, fail, open_audit_log, settings_for
from ztai.config import DEFAULT_CONFIG_PATH
from ztai.errors import ZtaiError
from ztai.identity import RevocationList, issue_token, parse_claims

app = typer.Typer(help="Issue and revoke tokens.", no_args_is_help=True)
keys_app = typer.Typer(help="Manage signing keys.", no_args_is_help=True)
err = Console(stderr=True)


@app.command("issue")
def issue(
    sub: Annotated[str, typer.Option(help="subject SPIFFE ID, spiffe://<trust-domain>/<kind>/<name>")],
    ttl: Annotated[int | None, typer.Option(help="lifetime in seconds (default from config)")] = None,
    claim: Annotated[list[str] | None, typer.Option(help="extra claim k=v; commas make a list")] = None,
    config: ConfigOption = DEFAULT_CONFIG_PATH,
) -> None:
    """Print a signed token for SUB (only the token, on stdout).

    Example: ztai token issue --sub spiffe://example.org/user/alice --ttl 300 --claim models=mock
    """
    typer.echo(_issue(config, sub, ttl, claim or []))


def _issue(config: Path, subject: str, ttl: int | None, claims: list[str]) -> str:
    settings = settings_for(config)
    database, keys, audit_log = open_audit_log(settings)
    try:
        extra_claims = parse_claims(claims)
        issued = issue_token(
            keys,
            subject=subject,
            issuer=settings.issuer,
            audience=settings.identity.audience,
            ttl_seconds=ttl if ttl is not None else settings.identity.default_ttl_seconds,
            max_ttl_seconds=settings.identity.max_ttl_seconds,
            claims=extra_claims,
        )
        # Durable before the token is handed out: no unrecorded credentials.
        audit_log.append(
            [
                identity_event(
                    "token.issued",
                    tenant=issued.tenant,
                    principal=issued.subject,
                    details={
                        "jti": issued.jti,
                        "expires_at": issued.expires_at,
                        "token_kind": issued.kind,
                        "claims": sorted(extra_claims),
                        "by": "cli",
                    },
                )
            ]
        )
    except ZtaiError as exc:
        fail(exc.message)
    finally:
        database.close()
    return issued.token


def issue_for_demo(config: Path) -> str:
    return _issue(config, "spiffe://example.org/user/demo", 3600, ["models=mock"])


@app.command("revoke")
def revoke(
    jti: Annotated[str, typer.Argument(help="the token's jti claim")],
    reason: Annotated[str, typer.Option(help="why (recorded in the audit log)")] = "",
    tenant: Annotated[str | None, typer.Option(help="tenant (default: the configured trust domain)")] = None,
    config: ConfigOption = DEFAULT_CONFIG_PATH,
) -> None:
    """Revoke a token everywhere (every replica refuses it within a second or so).

    Example: ztai token revoke 4f1c2e9a0b7d4c3e8f6a5b2c1d0e9f8a --reason "laptop lost"
    """
    settings = settings_for(config)
    database, _keys, audit_log = open_audit_log(settings)
    owner = tenant or settings.trust_domain
    # Our tokens live at most max_ttl (+ leeway): the revocation needs to be kept that long only.
    expires = time.time() + settings.identity.max_ttl_seconds + settings.identity.leeway_seconds
    try:
        RevocationList(database).revoke(owner, jti, expires, reason)
        audit_log.append(
            [
                identity_event(
                    "token.revoked",
                    tenant=owner,
                    principal=f"jti:{jti}",
                    details={"jti": jti, "reason": reason, "by": "cli"},
                )
            ]
        )
    except ZtaiError as exc:
        fail(exc.message)
    finally:
        database.close()
    err.print(f"revoked {jti}")


@keys_app.command("rotate")
def rotate(config: ConfigOption = DEFAULT_CONFIG_PATH) -> None:
    """Start signing with a new key; the old one verifies until its tokens have expired.

    Example: ztai keys rotate
    """
    settings = settings_for(config)
    database, keys, audit_log = open_audit_log(settings)
    try:
        old = keys.active.kid
        lifetime = settings.identity.max_ttl_seconds + settings.identity.leeway_seconds
        fresh = keys.rotate(lifetime)
        audit_log.append(
            [
                identity_event(
                    "keys.rotated",
                    tenant=settings.trust_domain,
                    principal=settings.issuer,
                    details={"old_kid": old, "new_kid": fresh.kid, "by": "cli"},
                )
            ]
        )
    finally:
        database.close()
    err.print(f"now signing with {fresh.kid}; {old} stays valid for verification for {lifetime}s")
