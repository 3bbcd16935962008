"""Fixtures and helpers shared by every kind of test: private servers, the real serve, load."""
