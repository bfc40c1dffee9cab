"""Training methods that plug into the generic loop (see ``base.Method``)."""
