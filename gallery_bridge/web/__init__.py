"""``gallery-bridge web``: the gallery as a web app (browse, detail, search, review, labels).

A Flask app (:mod:`.app`) served by waitress (:mod:`.serve`). It reads the
catalogue read-only and sends labels to the running ``serve``; see
docs/gallery_bridge.md ("Web app") for the pages and the JSON API.
"""
from .app import WebConfig, create_app

__all__ = ["WebConfig", "create_app"]
