"""anti_sus: a standalone image-filter server (CLIP features -> GMM outlier score -> watermark classifier)."""

__version__ = "0.1.0"
