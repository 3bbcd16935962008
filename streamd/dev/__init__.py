"""Private Redis and Postgres servers for trying streamd out and for its tests."""
