"""qsae's version, in a module with no imports (the lake records it in every store it creates)."""

__version__ = "0.1.0"
