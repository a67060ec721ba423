"""Patient identity never leaves the data cache: ids used for grouping are salted hashes.

A salted hash is a pseudonym only while the salt is secret (a 7-8 digit record number is recovered by hashing
every candidate in minutes), so the salt is `ICH_ID_SALT` or, without it, a random secret made once per
installation in the user's config directory and never written to an output.
"""

import contextlib
import functools
import hashlib
import os
import secrets
import tempfile
from pathlib import Path

SALT_VARIABLE = "ICH_ID_SALT"


def salt_file() -> Path:
    """Where this installation's secret salt lives: `$XDG_CONFIG_HOME/ich/id_salt` (default ~/.config)."""
    config = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config) / "ich" / "id_salt"


@functools.cache
def installation_salt() -> str:
    """The secret salt of this installation, made on first use (mode 0600).

    Made atomically: the random secret is written in full to a private file, then linked to its name, which
    fails if another process got there first; that process's salt is then read, so every process agrees.
    """
    path = salt_file()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        handle, draft = tempfile.mkstemp(dir=path.parent, prefix=".id_salt-")  # mkstemp creates it 0600
        try:
            with os.fdopen(handle, "w") as file:
                file.write(secrets.token_hex(32) + "\n")
            with contextlib.suppress(FileExistsError):  # another process linked its salt first: read that one
                os.link(draft, path)
        finally:
            os.unlink(draft)
    salt = path.read_text().strip()
    if not salt:
        raise ValueError(f"The salt file {path} is empty: delete it to make a new one, or set {SALT_VARIABLE}.")
    return salt


def pseudonym(value: str) -> str:
    """A short stable stand-in for a PatientID or UID (empty stays empty: 'unknown' is not an identity)."""
    if not value:
        return ""
    salt = os.environ.get(SALT_VARIABLE) or installation_salt()
    return "P" + hashlib.sha256(f"{salt}:{value}".encode()).hexdigest()[:12]
