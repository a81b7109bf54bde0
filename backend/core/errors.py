"""Error types whose message is meant for a person: the CLI prints them as one line."""

from __future__ import annotations


class HistosamError(Exception):
    """A user-facing error: bad input, missing file, mismatched checkpoint.

    The CLI prints ``str(exc)`` on one line and exits with ``exit_code``; the server maps the
    subclasses below to gRPC status codes.
    """

    exit_code = 1


class InvalidInputError(HistosamError):
    """The input cannot be used as given (undecodable image, NaN coordinates, bad file)."""

    exit_code = 2


class NotFoundError(HistosamError):
    """A named thing (model, session, file) does not exist."""

    exit_code = 3


class ResourceLimitError(HistosamError):
    """The input is larger than a configured limit (pixels, bytes, points)."""

    exit_code = 4


class PermissionDeniedError(HistosamError):
    """The input points somewhere it may not (a slide outside the allowed roots)."""

    exit_code = 5


class CancelledError(HistosamError):
    """The request was cancelled (client gone, deadline passed, server shutting down) mid-work."""

    exit_code = 130


class CheckpointError(HistosamError):
    """A checkpoint is missing, truncated, or does not match the chosen model."""

    exit_code = 6


class BundleError(HistosamError):
    """A model bundle is incomplete or its files do not match the manifest's sha256."""

    exit_code = 7


class ParityError(HistosamError):
    """ONNX and PyTorch disagree beyond the tolerance: the export is refused."""

    exit_code = 8
