"""Delivery: batches to anti_sus, then accepted images to gallery_bridge or ``--save-dir``.

Nothing is dropped. A batch that anti_sus cannot take right now is kept and
retried with backoff while the crawler waits (downloads pause, so memory stays
bounded); accepted images sit in the store's outbox, on disk, until the gallery
acknowledges them, and are redelivered after a restart. An image the gallery
keeps refusing backs off on its own and ends in the dead letters (``nomad
retry-dead`` puts it back) instead of blocking the rest.

One job per module:

* :mod:`.batch` — decoded images waiting for a full or timed-out batch;
* :mod:`.dupskip` — before anti_sus, drop what the gallery already holds
  (its ``have`` op; a gallery that does not answer skips the check);
* :mod:`.filter` — a batch to anti_sus, with patience and halving;
* :mod:`.outbox` — the outbox drain, per-item retries and dead letters;
* :mod:`.destinations` — gallery_bridge (CURVE keys) and ``--save-dir``, and
  the metadata an accepted image carries;
* :mod:`.patience` — stop-aware retry waits shared by the two above;
* :mod:`.review` — a bounded sample of the rejected images, nearest the
  thresholds first, to the gallery's review queue (only a sample: never waits).
"""
from __future__ import annotations

from .batch import Batcher, Downloaded
from .destinations import CurveKeys, GalleryDeliverer, SaveDirDeliverer, curve_keys, ingest_meta
from .filter import FilterStage, merge_results
from .outbox import DEFAULT_MAX_DELIVERY_ATTEMPTS, Deliverer, DeliveryDeferred, DeliveryRefused, DeliveryUnavailable
from .outbox import drain_outbox, retry_delay
from .patience import Patience, Stopped

__all__ = [
    "Batcher", "Downloaded", "CurveKeys", "GalleryDeliverer", "SaveDirDeliverer", "curve_keys", "ingest_meta",
    "FilterStage", "merge_results", "DEFAULT_MAX_DELIVERY_ATTEMPTS", "Deliverer", "DeliveryDeferred",
    "DeliveryRefused", "DeliveryUnavailable", "drain_outbox", "retry_delay", "Patience", "Stopped",
]
