"""Shared plumbing of every wmpo service: tensor codec, configuration, logging, metrics, CLI,
gRPC/Redis/Triton process helpers.

Importing this package (and `wmpo.common.tensors`) needs only numpy: the robot client relies on it.
Heavier modules (config, logs, metrics, cli) import their dependencies themselves.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("wmpo")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"

__all__ = ["__version__"]
