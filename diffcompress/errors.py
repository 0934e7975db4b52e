"""The error type for mistakes a user can fix (bad flags, files, data): scripts print its message as one line."""


class UserError(RuntimeError):
    pass
