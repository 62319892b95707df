"""Audit: an append-only RFC 9162-style Merkle log with signed checkpoints, proofs and exporters."""

from ztai.audit.log import AuditLog, Checkpoint, VerifyReport, verify_checkpoint
from ztai.audit.writer import AuditWriter

__all__ = ["AuditLog", "AuditWriter", "Checkpoint", "VerifyReport", "verify_checkpoint"]
