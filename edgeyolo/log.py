"""The package logger; the CLI routes it to stderr, libraries leave it to the caller."""

import logging

log = logging.getLogger("edgeyolo")
