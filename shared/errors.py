"""Errors that reach a user as one line (the CLI prints ``str(err)`` and exits non-zero)."""


class MDMTError(Exception):
    """Base class: a user-facing problem whose message says what to fix."""


class ConfigError(MDMTError):
    """A bad configuration key or value."""


class DataError(MDMTError):
    """A bad federation, site, manifest or cache."""


class DicomRejected(MDMTError):
    """One DICOM file cannot be used; the message is the reason written to rejected.csv."""


class ProtocolError(MDMTError):
    """A message between server and site that does not have the agreed form."""
