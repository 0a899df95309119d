"""LeafGuard: passive security monitoring of IoT leaf devices behind an IoT Edge gateway."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("leafguard")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0"

__all__ = ["__version__"]
