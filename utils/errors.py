"""Bad input the user can fix, reported as one line at the entry point instead of a traceback."""

import functools
import sys


class UserError(Exception):
    """Bad input: the message names the file, flag or value and says what to do."""


def one_line(error: BaseException) -> str:
    """The user-facing line of an error; a UserError re-raised by a DataLoader worker carries the original
    traceback in its message, whose last line is the original message."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    last = lines[-1]
    marker = f"{UserError.__name__}: "
    return last.split(marker, 1)[1] if marker in last else last


def exit_on_user_error(main):
    """Decorate an entry point: a UserError ends the program with 'error: <one line>' and exit status 2; so does
    an operating-system error on a named file (a folder that cannot be written, a full disk), naming the file."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as error:
            print(f"error: {one_line(error)}", file=sys.stderr)
            sys.exit(2)
        except OSError as error:
            if error.filename is None:
                raise
            print(f"error: cannot write or read {error.filename} ({error.strerror}): check that path, its "
                  f"permissions and the free space", file=sys.stderr)
            sys.exit(2)

    return wrapped


class NonFiniteLossError(Exception):
    """The loss became NaN or infinite. terms: the loss terms {name: value} of the first such step of this process
    (empty when another process's loss was the one); steps_ago: how many steps before the check that step was
    (None when unknown)."""

    def __init__(self, terms: dict, steps_ago: int | None):
        super().__init__(", ".join(f"{name}={value:.4g}" for name, value in terms.items())
                         or "the loss of another process")
        self.terms, self.steps_ago = terms, steps_ago
