"""The one error type a user can cause: a bad model file, folder, setting or prompt.

The CLI prints its message as a single line and exits with status 2; programs that
embed the runtime catch it. Anything else escaping is a bug in the runtime.
"""


class ModelError(Exception):
    """A problem with the user's input (model files, config, arguments), not a bug."""
