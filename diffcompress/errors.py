"""The error type for mistakes a user can fix (bad flags, files, data): scripts print its message as one line."""


class UserError(RuntimeError):
    pass


class DataError(UserError, ValueError):
    """A bad input file met while reading data, raised where it is read (often inside a DataLoader worker); a
    ValueError too, as the data code raised before.

    torch re-raises a worker's exception in the main process as ``type(e)("Caught DataError in DataLoader worker
    process 0.\\nOriginal Traceback ...\\n<module>.DataError: <message>")``: this class keeps only ``<message>``
    (the last line), so the one line a script prints still names the file, with the worker said after it."""

    def __init__(self, message: object = ""):
        text = str(message)
        if text.startswith("Caught ") and "\nOriginal Traceback" in text:
            where = text.split("\n", 1)[0][len("Caught ") :].rstrip(".")  # "DataError in DataLoader worker process 0"
            last = [line for line in text.splitlines() if line.strip()][-1]
            name = f"{type(self).__module__}.{type(self).__qualname__}: "
            for prefix in (name, f"{type(self).__qualname__}: "):
                if last.startswith(prefix):
                    last = last[len(prefix) :]
                    break
            text = f"{last} ({where.split(' in ', 1)[-1]})"
        super().__init__(text)
