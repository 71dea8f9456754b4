"""The package version: a leaf module, so that anything (provenance records) can read it
without importing the package root, which imports the whole API."""

__version__ = "0.1.0"
