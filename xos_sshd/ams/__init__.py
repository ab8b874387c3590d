"""Account Mapping Service: VOIdentity -> LocalAccount, with leases and NSS tables.

See ``docs/internals.md`` (section "ams") for the contract and
``/work/shared/design.md`` (section "AMS") for the guarantees.
"""

from .model import (
    HistoryEvent,
    LocalAccount,
    MappingPreview,
    MappingRecord,
    MappingRefused,
    RangeError,
    VOPolicy,
)
from .policy import sanitise_name
from .ranges import read_system_ids, validate_policies
from .service import AMS, UnknownMapping, rewrite_nss_sync

__all__ = [
    "AMS",
    "HistoryEvent",
    "LocalAccount",
    "MappingPreview",
    "MappingRecord",
    "MappingRefused",
    "RangeError",
    "UnknownMapping",
    "VOPolicy",
    "read_system_ids",
    "rewrite_nss_sync",
    "sanitise_name",
    "validate_policies",
]
