"""The one exception the data pipeline raises for bad input."""


class DataError(ValueError):
    """A dataset problem (missing folder, unreadable file, bad setting), with a message meant for the user."""
