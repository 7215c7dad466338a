"""Typed errors. Every error samreg-rt raises on bad input derives from ``SamregError`` and names
the file (or argument) and the problem in its message."""
from __future__ import annotations


class SamregError(Exception):
    """Base class of every samreg-rt error."""


class InputError(SamregError, ValueError):
    """An image, label, landmark file or array that cannot be used."""


class OutputError(SamregError):
    """An output directory or file that cannot be created or written (names the path)."""


class ModelError(SamregError):
    """A model directory, graph file, checkpoint or registry entry that cannot be used."""


class ManifestError(ModelError):
    """A manifest that is missing, malformed, from an unknown format version, or does not match
    the files beside it (sha256 mismatch)."""


class CheckpointError(ModelError):
    """A checkpoint that cannot be loaded: missing or extra keys, wrong shapes, not a state dict."""


class ModelNotAvailableError(ModelError):
    """A model that is neither cached nor exportable here (no export extra, no network)."""
