"""gallery_bridge: ingests good images into a gallery exactly once, with duplicate checks.

Layout: ``server`` (the ROUTER loop answering ingest, ping and info) checks
each request with ``validate``, ``ingest`` decides (``dedup``) and records it
in the ``catalogue`` and a ``targets`` backend (a folder with ``thumbnails`` and
a ``page``, or scenery); ``client`` is the Python client nomad uses; ``cli``
and ``wiring`` turn flags into these objects.

From :mod:`photocore` it takes the shared plumbing, nothing from anti_sus: the
protocol framing and error codes (``photocore.protocol``), the envelope split
(``photocore.envelope``), the Lazy Pirate client its ``IngestClient`` builds on
(``photocore.client``, so nomad reaches it over CURVE with the same code as
anti_sus), CURVE server setup and the client allow-list (``photocore.curve``),
magic-byte sniffing (``photocore.sniff``), durable writes of the folder target
(``photocore.atomic``), log redaction (``photocore.redact``), scenery retry
waits (``photocore.backoff``), logging and metrics (``photocore.observe``) and
the configuration layer (``photocore.settings``).
"""

__version__ = "0.1.0"
