"""The one exception type users see.

Every error raised for bad input derives from :class:`CircuitAtlasError`; its
message is one line that names the file or value at fault and, where possible,
the fix. The CLI prints that line and exits with status 2 instead of a traceback.
"""


class CircuitAtlasError(Exception):
    """Bad input or a lake in a state we refuse to read or write."""


class LakeError(CircuitAtlasError):
    """A lake path, file or schema problem."""


class PromptFileError(CircuitAtlasError):
    """A prompt file that cannot be imported."""
