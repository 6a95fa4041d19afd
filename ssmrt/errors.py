"""The one error family ssmrt raises for problems a user can fix (bad files, arguments, shapes)."""


class SsmrtError(Exception):
    """A user-facing error: the message names the file, tensor or argument and what was expected."""


class CheckpointError(SsmrtError):
    """A checkpoint directory that cannot be read as a supported model."""
