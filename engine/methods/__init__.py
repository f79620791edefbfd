"""Delta methods, one module each; each registers itself with :mod:`engine.registry`."""
