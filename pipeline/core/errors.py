"""The exceptions softlabels raises for problems a user can fix.

Every stage and CLI command catches `SoftlabelsError` at the top, prints its message (which names
the offending file, key or field and says what to do) and exits non-zero without a traceback.
An OSError from the filesystem the user chose (disk full, read-only, permission denied, a file
where a folder is expected) is reported the same way (`os_error_message`): the stages write
their outputs atomically, so nothing half-written is left behind to explain. Anything else
escaping is a bug and keeps its traceback.
"""

import errno
import re


class SoftlabelsError(Exception):
    """Base class: a problem with the user's input, params or artifacts, not a bug."""


class ConfigError(SoftlabelsError, ValueError):
    """A param in params.yaml (or a keyword argument) is missing, unknown or invalid."""


class InputError(SoftlabelsError):
    """An input file or artifact is missing, empty, malformed or inconsistent."""


class StoreError(SoftlabelsError):
    """A logits store is incomplete, corrupt, or incompatible with its consumer."""


_OS_ADVICE: dict[int, str] = {
    errno.ENOSPC: "the disk is full: free space or point the output at another disk",
    errno.EDQUOT: "the disk quota is exceeded: free space or point the output elsewhere",
    errno.EROFS: "the filesystem is read-only: choose a writable output path",
    errno.EACCES: "permission denied: check the folder's permissions or choose another path",
    errno.EPERM: "operation not permitted: check the folder's permissions or choose another path",
    errno.ENOTDIR: "a parent of this path is a file, not a folder: choose another path",
    errno.EISDIR: "this path is a folder where a file is expected: choose another path",
    errno.EEXIST: "a file is in the way where a folder is needed: choose another path",
    errno.ENAMETOOLONG: "the path is too long: choose a shorter one",
    errno.EMFILE: "too many open files: raise the limit (`ulimit -n`) and re-run",
}
"""The OSErrors that are the user's environment, not a bug, and what to do about each."""


def os_error_message(e: OSError) -> str | None:
    """One line for an OSError in `_OS_ADVICE` (naming the file and what to do), else None."""
    advice = _OS_ADVICE.get(e.errno or -1)
    if advice is None:
        return None
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror or errno.errorcode.get(e.errno or 0, 'error')}; {advice}"


_WORKER = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback", re.S)


def user_message(e: BaseException) -> str:
    """The message of a SoftlabelsError for the user. One raised in a torch DataLoader worker
    arrives re-wrapped with the worker's traceback in its text; only the original message (the
    text after the last `<module>.<Class>: `) is kept."""
    text = str(e)
    if _WORKER.match(text):
        name = type(e).__name__
        marker = text.rfind(f"{name}: ")
        if marker >= 0:
            return text[marker + len(name) + 2 :].rstrip()
    return text


def user_error(e: BaseException) -> str | None:
    """The message for a problem the user can fix: a SoftlabelsError (`user_message`) or an
    OSError of their filesystem (`os_error_message`); None for anything else (a bug)."""
    if isinstance(e, SoftlabelsError):
        return user_message(e)
    if isinstance(e, OSError):
        return os_error_message(e)
    return None


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's text, or its type name if it has none.

    Library errors (transformers, pyarrow, PyYAML) often explain themselves over several lines;
    a softlabels message is one line, so a wrapped library error contributes its first.
    """
    for line in str(e).splitlines():
        if line.strip():
            return line.strip()
    return type(e).__name__


def load_errors() -> tuple[type[BaseException], ...]:
    """What loading a damaged or incomplete model/tokenizer folder raises, as opposed to a bug:
    OSError (a missing or unreadable file), ValueError (a bad config or JSON file) and
    safetensors' SafetensorError (truncated or corrupt weights)."""
    from safetensors import SafetensorError

    return (OSError, ValueError, SafetensorError)
