"""Parameter sharing passes: one initializer for identical or nearly identical weights."""
