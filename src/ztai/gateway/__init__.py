"""The gateway: the ASGI app and its routes (OpenAI-compatible API, JWKS, health, metrics)."""
