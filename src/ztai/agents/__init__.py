"""Agents under zero trust: tool annotations, session taint and value provenance, tool-call decisions."""
