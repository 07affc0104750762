"""The error a user can fix. The CLI prints its message as one line and exits with status 2."""


class DistilleryError(ValueError):
    """Bad input: a file, a config key, a spec or a store that cannot be used as it is. The message names it."""
