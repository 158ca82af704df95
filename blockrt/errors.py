"""Errors for bad user input: raised where the input is first seen, in the words of that input."""


class UserError(ValueError):
    """Bad input from the user (a flag, a file, a prompt, a value): shown as one line, no traceback."""


class MissingDependencyError(UserError, ImportError):
    """An optional library is not installed; the message says which extra installs it."""


def require(module: str, extra: str, what: str):
    """Import an optional module or raise MissingDependencyError naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(f"{what} needs the Python module '{module}', which is not installed "
                                     f"({e}); install it with: pip install 'blockrt[{extra}]'") from None
