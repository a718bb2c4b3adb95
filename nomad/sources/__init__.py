"""Per-site extractors: one module per site."""
