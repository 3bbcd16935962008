"""Small helpers every layer may use: asyncio waits, text from bytes, process liveness, backoff."""
