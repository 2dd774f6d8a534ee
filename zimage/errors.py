"""The one exception type whose message is meant for a person: the CLI prints it without a traceback
and pages show it as an error box. Every module's refusals derive from it."""


class UserError(ValueError):
    """Bad input or an unusable resource; the message names the field or file and says why."""
