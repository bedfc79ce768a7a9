"""ANIM gateway: the archive core (no networking)."""

from __future__ import annotations

import logging

from anim.archive import Archive
from anim.config import Config, DimseConfig, KnownAE, WebConfig, load_config
from anim.errors import (
    AnimError,
    ConfigError,
    InvalidInstance,
    InvalidQuery,
    NotAcceptable,
    NotFound,
    SOPClassMismatch,
    StorageUnavailable,
    StudyMismatch,
)
from anim.models import Source, StoredInstance, StoreOutcome, StoreResult, VersionInfo, VersionState
from anim.query import Level, Query

__version__ = "0.1.0"

__all__ = [
    "AnimError",
    "Archive",
    "Config",
    "ConfigError",
    "DimseConfig",
    "InvalidInstance",
    "InvalidQuery",
    "KnownAE",
    "Level",
    "NotAcceptable",
    "NotFound",
    "Query",
    "SOPClassMismatch",
    "Source",
    "StorageUnavailable",
    "StoreOutcome",
    "StoreResult",
    "StoredInstance",
    "StudyMismatch",
    "VersionInfo",
    "VersionState",
    "WebConfig",
    "__version__",
    "load_config",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
