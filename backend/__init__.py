"""histosam serving side: numpy + onnxruntime + gRPC, never torch."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("histosam")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

