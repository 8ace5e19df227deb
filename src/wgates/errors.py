"""The one exception type users see: it says what was wrong and what to do."""


class WgatesError(ValueError):
    """Bad input or an unsupported model; the message names the culprit and the fix."""
