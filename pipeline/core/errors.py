"""The exceptions softlabels raises for problems a user can fix.

Every stage and CLI command catches `SoftlabelsError` at the top, prints its message (which names
the offending file, key or field and says what to do) and exits non-zero without a traceback.
Anything else escaping is a bug and keeps its traceback.
"""


class SoftlabelsError(Exception):
    """Base class: a problem with the user's input, params or artifacts, not a bug."""


class ConfigError(SoftlabelsError, ValueError):
    """A param in params.yaml (or a keyword argument) is missing, unknown or invalid."""


class InputError(SoftlabelsError):
    """An input file or artifact is missing, empty, malformed or inconsistent."""


class StoreError(SoftlabelsError):
    """A logits store is incomplete, corrupt, or incompatible with its consumer."""
