"""Redis and Postgres themselves: connections, start-up checks, the schema, grants, SQL helpers
and the classification of their faults."""
