"""Agents under zero trust: task grants, tool annotations, session taint and value provenance."""
