"""Pipeline stages of the filter server."""
