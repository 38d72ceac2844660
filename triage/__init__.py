"""glowtriage: flags abnormal head CTs for radiologists with two Glow flows (M0 normal, M1 mixture)."""

from importlib import metadata

try:
    __version__ = metadata.version("glowtriage")
except metadata.PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"
