"""The one exception type for mistakes a user can fix (bad argument, missing file, unsupported model).

The CLI turns it into one line on stderr and exit status 2; anything else is a bug (exit 1).
"""


class UserError(ValueError):
    """A problem with the user's input, with a message that says what to change."""
