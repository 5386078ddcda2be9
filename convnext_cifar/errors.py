"""The one exception type for mistakes a user can fix; cli.py makes it one line and exit 2."""

import importlib
from types import ModuleType


def install_extra(extra: str) -> str:
    """How to add an optional extra, from the clone the Quickstart installs (the package's
    extras are named after the dot there; `all` holds every feature)."""
    return f"pip install '.[{extra}]' from the project's clone"


def need_extra(module: str, what: str, extra: str) -> ModuleType:
    """`module` imported, or one UserError saying `what` needs `extra` and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{what} needs the {extra} extra: {install_extra(extra)}") from None


class UserError(Exception):
    """A request that cannot be done; the message says what is wrong and what to do."""


class TrainingDiverged(UserError):
    """Loss or gradient norm became non-finite; the run stopped without saving."""

    exit_code = 1


class Interrupted(Exception):
    """The run stopped on SIGINT/SIGTERM after writing a resumable state (exit 128 + signal)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class Pruned(Exception):
    """The run was stopped early at its caller's request (a tuner pruned the trial)."""
