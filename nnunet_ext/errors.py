"""Errors that report bad user input. The CLI prints their message (no traceback) and exits 2."""


class UserInputError(Exception):
    """Something the user gave (a path, an id, a name, an option) cannot be used; the message says why
    and what to do."""
