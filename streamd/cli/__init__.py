"""The `streamd` command line: parse, build Settings, call one function. No logic lives here.

`app` holds the group and its shared options; each other module adds one family of commands.
"""

from streamd.cli import dev, dlq, load, observe, serve
from streamd.cli.app import add_settings_options, cli, main
from streamd.errors import EXIT_USAGE

# `logs` reads no settings, and `dev` configures servers rather than streamd.
add_settings_options(cli, skip={observe.logs, dev.dev})

__all__ = ["EXIT_USAGE", "cli", "dlq", "load", "main", "serve"]
