"""Patient identity never leaves the data cache: ids used for grouping are salted hashes."""

import hashlib
import os

# A deployment sets its own secret salt; the default keeps hashes stable across runs of one project.
_SALT = os.environ.get("ICH_ID_SALT", "ich-default-salt")


def pseudonym(value: str) -> str:
    """A short stable stand-in for a PatientID or UID (empty stays empty: 'unknown' is not an identity)."""
    if not value:
        return ""
    return "P" + hashlib.sha256(f"{_SALT}:{value}".encode()).hexdigest()[:12]
