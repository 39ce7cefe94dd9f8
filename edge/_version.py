"""edge's version, in one place (the package, bundle manifests and the wheel read it)."""

__version__ = "0.1.0"
