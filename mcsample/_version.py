"""The package version, importable without torch (``mcsample --version``, the build)."""

__version__ = "0.1.0"
