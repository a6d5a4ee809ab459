"""scfm: single-cell foundation models with one corpus format, one backbone of parts, one experiment system."""

__version__ = "0.1.0"
