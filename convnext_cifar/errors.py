"""The one exception type for mistakes a user can fix; cli.py makes it one line and exit 2."""


class UserError(Exception):
    """A request that cannot be done; the message says what is wrong and what to do."""
