"""Config checks and transforms that run before any data is read: ``validate`` and ``scale``."""
