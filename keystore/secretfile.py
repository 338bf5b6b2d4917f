"""The one rule for files that hold a secret (the keystore's pepper, the relay's TLS private
key, an upstream's password file): a regular file, owned by the user running the program,
mode 0600 or stricter.

Group-readable is refused too: a group is a set of other users, and whoever can read the
pepper together with a copy of the keystore can test guessed keys offline; whoever can read
the TLS key can impersonate the relay. Another owner could change the mode back at any time.
Here, not in the relay, because the keystore may not import the relay (it is the relay's
dependency); the relay uses this module for its own secret files.
"""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

__all__ = ["secret_file_problem"]


def secret_file_problem(path: Path, info: os.stat_result, what: str) -> str | None:
    """Why `path` (whose stat is `info`) must not hold a secret, naming `what` it holds and
    the command that fixes it; None when it is fine."""
    if not stat.S_ISREG(info.st_mode):
        return f"{path}: the {what} is not a regular file"
    me = os.geteuid()
    if info.st_uid != me:
        return (f"{path}: the {what} is owned by {_user(info.st_uid)}, not by {_user(me)} who runs "
                f"this; run `chown {_user(me, for_command=True)} {path}`")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        return (f"{path}: the {what} has mode {mode:04o}, which lets other users read or change it; "
                f"run `chmod 600 {path}`")
    return None


def _user(uid: int, *, for_command: bool = False) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:  # no name for it (a file from another machine or a container)
        return str(uid) if for_command else f"uid {uid}"
