"""gallery_bridge: ingests good images into a gallery exactly once, with duplicate checks."""

__version__ = "0.1.0"
