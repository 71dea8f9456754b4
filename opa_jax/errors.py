"""One exception type for bad user input, so scripts can exit cleanly."""

import contextlib
import sys


class InputError(ValueError):
    """Bad user input: a wrong path, an unknown model, a corrupt file, a config typo.

    The message names the input and says what was expected. Scripts catch it,
    print the message and exit with status 2, writing nothing further.
    """


@contextlib.contextmanager
def exit_on_input_error():
    """In a script: an `InputError` prints `error: MESSAGE` on stderr and exits with status 2."""
    try:
        yield
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
