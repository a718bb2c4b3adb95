"""anti_sus: a standalone image-filter server (CLIP features -> GMM outlier score -> watermark classifier).

Layout: ``server`` (ROUTER loop, fair queue, batching) and ``broker`` (one
endpoint for several servers) answer requests parsed by ``wire``; ``pipeline``
runs the ``stages`` (ONNX CLIP and watermark, GMM) on what ``preprocess`` makes
of the wire images; ``modeldir`` reads and checks the model directory;
``client`` is the public Python client (``from anti_sus.client import FilterClient``,
the one anti_sus module other services import); ``cli`` holds the commands.

From :mod:`photocore` it takes the plumbing the three services share: the
protocol framing and error codes (``photocore.protocol``), the ROUTER envelope
split (``photocore.envelope``), the Lazy Pirate client its ``FilterClient``
builds on (``photocore.client``, with ``photocore.backoff`` for ``busy``),
CURVE keys and allow-lists (``photocore.curve``), logging and metrics
(``photocore.observe``), the wire image format (``photocore.wireimage``,
re-exported by ``anti_sus.preprocess`` for the offline tools) and atomic
writes of the manifest (``photocore.atomic``).
"""

__version__ = "0.1.0"
