"""One base class for errors a user caused and can fix: the CLI prints them without a traceback."""


class SteerrayError(Exception):
    """Bad input, config, data or model name; the message says what and where."""
