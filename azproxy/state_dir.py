"""The state directory (AZPROXY_STATE_DIR): where the local CA, tenancy records and the pid file live.

Checked without importing `cryptography`, so start-up can find a bad directory cheaply.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)


class StateDirError(RuntimeError):
    """The state directory cannot be used; the message names it and the setting to change."""


def check_state_dir(path: Path) -> None:
    """Make `path` a private directory azproxy can write, or raise StateDirError saying why it cannot.

    Cheap enough to call at start-up, so a bad AZPROXY_STATE_DIR shows before the first intercepted tunnel."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        _make_private(path)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "not writable by this user")
    except OSError as error:
        cause = "a file that is not a directory is in the way" if isinstance(error, FileExistsError) else None
        raise StateDirError(
            f"azproxy cannot use {path} as its state directory ({cause or error.strerror or error}); "
            "set AZPROXY_STATE_DIR to a directory it may create and write."
        ) from error


def _make_private(path: Path) -> None:
    """Whoever can write the state directory can swap the CA key for their own, so only its owner may."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if not mode & (stat.S_IWGRP | stat.S_IWOTH):
        return
    if mode & stat.S_ISVTX:
        # A sticky directory such as /tmp is shared by design; making it 0700 would break everyone else.
        raise PermissionError(errno.EPERM, "a shared directory writable by others")
    path.chmod(0o700)
    log.warning("State directory %s was writable by others (mode %o); changed it to 0700", path, mode)
