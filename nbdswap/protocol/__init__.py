"""The NBD wire protocol, sans-IO: bytes in, events out; replies in, bytes out."""

from .connection import (
    BASE_ALLOCATION_CONTEXT_ID,
    Disconnect,
    Export,
    ExportCatalog,
    OptionHandled,
    OptionTooLarge,
    ProtocolViolation,
    Request,
    RequestRejected,
    ServerConnection,
    StartTLS,
    TlsMode,
    TransmissionStarted,
)
from .constants import AllocationState, Command, CommandFlag, Errno

__all__ = [
    "AllocationState", "BASE_ALLOCATION_CONTEXT_ID", "Command", "CommandFlag", "Disconnect",
    "Errno", "Export", "ExportCatalog", "OptionHandled", "OptionTooLarge", "ProtocolViolation",
    "Request", "RequestRejected", "ServerConnection", "StartTLS", "TlsMode", "TransmissionStarted",
]
