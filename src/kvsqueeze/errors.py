"""The one exception type the CLI turns into a one-line message."""


class KVSqueezeError(ValueError):
    """Bad input or a missing resource, with a message that says what to do."""
