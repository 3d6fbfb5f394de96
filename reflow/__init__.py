"""reflow: fast RLHF where every model function call gets its own parallel layout."""

__version__ = "0.1.0"
