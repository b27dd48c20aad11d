"""The errors every part of the sweep raises for bad input (one line, naming the field)."""


class ConfigError(ValueError):
    """An invalid config value; the message starts with the dotted field name."""

    def __init__(self, field: str, problem: str):
        self.field = field
        super().__init__(f"{field}: {problem}")


class SweepConfigError(ValueError):
    """One or more configs of a sweep are invalid; lists every one of them."""
