"""gallery_bridge: ingests good images into a gallery exactly once, with duplicate checks."""
