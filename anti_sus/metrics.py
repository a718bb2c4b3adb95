"""Prometheus metrics of the filter server (served by ``observe.start_metrics``)."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("anti_sus_requests_total", "Requests answered, by op and outcome", ["op", "outcome"])
IMAGES = Counter("anti_sus_images_total", "Images filtered, by verdict", ["verdict"])
ERRORS = Counter("anti_sus_errors_total", "Error replies, by code", ["code"])
STAGE_SECONDS = Histogram(
    "anti_sus_stage_seconds", "Seconds per batch spent in each pipeline stage", ["stage"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
BATCH_IMAGES = Histogram("anti_sus_batch_images", "Images per pipeline batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
QUEUE_DEPTH = Gauge("anti_sus_queue_images", "Images waiting for the pipeline")
QUEUE_BYTES = Gauge("anti_sus_queue_bytes", "Payload bytes held (queued + the batch being computed); bounded by --max-queued-bytes")
