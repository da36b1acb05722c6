"""The error the dataset modules raise for input that is not what the official data promises."""

from __future__ import annotations


class DatasetLayoutError(ValueError):
    """The raw folder (or the tiles folder) does not hold what it should: a file, tile or split is missing."""
