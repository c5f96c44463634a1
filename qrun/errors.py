"""The one exception type that user-facing code raises for bad input."""


class QrunError(Exception):
    """A problem with the user's configuration or data, reported as one line without a traceback."""


def choice_error(what: str, value: object, accepted: "list[str] | tuple[str, ...]") -> QrunError:
    """Build the standard 'bad value, here are the good ones' error."""
    return QrunError(f"unknown {what} {value!r}; accepted: {', '.join(sorted(map(str, accepted)))}")
