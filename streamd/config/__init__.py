"""Settings: the keys, their sources (flags, environment, file) and how `streamd config` shows
them. A leaf: it imports nothing from streamd but errors."""
