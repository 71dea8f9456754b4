"""One exception type for bad user input, so scripts can exit cleanly."""


class InputError(ValueError):
    """Bad user input: a wrong path, an unknown model, a corrupt file, a config typo.

    The message names the input and says what was expected. Scripts catch it,
    print the message and exit with status 2, writing nothing further.
    """
