"""repd's own exception for problems a person can act on (kept import-light for the CLI)."""


class EngineError(Exception):
    """A problem a person can act on; the message is one clear line."""
