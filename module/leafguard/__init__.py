"""LeafGuard: passive security monitoring of IoT leaf devices behind an IoT Edge gateway."""

# The one place the version is written (pyproject.toml reads it from here); a literal, because looking it up in the
# installed distribution's metadata costs every command ~15 ms of start-up.
__version__ = "0.1.0"

__all__ = ["__version__"]
