"""Typed registry errors: each says what was wrong and what to do."""
from __future__ import annotations

from .. import CorruptDataError


class RegistryError(Exception):
    """Base of every error the registry raises on purpose."""


class NotFoundError(RegistryError, LookupError):
    """No such model, version or label (HTTP 404)."""


class ConflictError(RegistryError, ValueError):
    """The request contradicts the store's state: deleting a labelled version, rolling back a label
    with no earlier version, a store written by a newer aimass (HTTP 409)."""


class InvalidArgumentError(RegistryError, ValueError):
    """A bad name, label, version, metrics value or store location (HTTP 400)."""


class IntegrityError(RegistryError, CorruptDataError):
    """A stored artifact does not match its sha256, is missing, or is not a valid .aimass model."""
