"""echfront version (single source for setup.cfg and the CLI)."""

__version__ = "0.1.0"
