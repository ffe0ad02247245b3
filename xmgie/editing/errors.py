"""Errors raised for input a user can fix.

Each carries a short machine-readable ``code`` so that the job service can report it as an
item's error code without parsing messages.
"""

from __future__ import annotations


class EditInputError(ValueError):
    """An image, mask, instruction or option that cannot be edited, with a stable ``code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"
