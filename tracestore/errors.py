"""The one exception type users see: a message that says what is wrong and where."""


class TraceError(Exception):
    """A problem the user can fix (bad path, corrupt file, unknown name). The CLI prints it as one line."""
