"""repd's own exceptions for problems a person can act on (kept import-light for the CLI)."""


class EngineError(Exception):
    """A problem a person can act on; the message is one clear line."""


class ConfigError(Exception):
    """Bad configuration; ``problems`` holds one human-readable line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems
