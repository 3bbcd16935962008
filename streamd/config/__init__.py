"""Settings: the keys, their sources (flags, environment, file) and how `streamd config` shows
them. A leaf: it imports nothing from streamd but errors."""

from streamd.config.settings import SECRET_KEYS, Settings, mask_url
from streamd.config.sources import field_names, load_settings

__all__ = ["SECRET_KEYS", "Settings", "field_names", "load_settings", "mask_url"]
