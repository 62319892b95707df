"""The `ztai` command-line interface (Typer + Rich)."""
