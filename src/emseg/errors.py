"""The one exception family users see.

Every problem a user can cause (bad params, bad files, a model that does not exist) raises a
subclass of :class:`EmsegError`. The CLI catches it once and prints a single line; anything else
escaping is a bug and keeps its traceback.
"""


class EmsegError(Exception):
    """Base class of every error meant for a user."""


class ConfigError(EmsegError):
    """params.yaml (or a command-line override) is missing a key, has an unknown key or a bad value."""


class DataError(EmsegError):
    """An input stack is missing, unreadable, corrupt or inconsistent."""


class DownloadError(EmsegError):
    """A dataset could not be fetched or failed its checksum."""


class OutputError(EmsegError):
    """An output cannot be written (exists, no permission, disk full)."""
