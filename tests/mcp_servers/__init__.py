"""MCP servers for tests, written with the official `mcp` SDK and run as real processes."""
