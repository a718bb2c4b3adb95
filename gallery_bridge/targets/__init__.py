"""Gallery targets: the embedded folder and a scenery instance."""
