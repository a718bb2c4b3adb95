"""nomad: crawls reddit /r/all (new), imgur and flickr for good photos and sends them to anti_sus."""

VERSION = "0.1.0"

DEFAULT_USER_AGENT = f"python:nomad-photo-miner:{VERSION} (by /u/nomad_operator)"
"""The one User-Agent default (``--user-agent``/``NOMAD_USER_AGENT``), reddit's required form
'<platform>:<app id>:<version> (by /u/<user>)'; every client class defaults to it."""
