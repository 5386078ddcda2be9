"""The one exception type for mistakes a user can fix; `cli.py` turns it into one line and exit 2."""


class UserError(Exception):
    """Something the user asked for cannot be done; the message says what is wrong and what to do."""
