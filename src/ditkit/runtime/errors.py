"""The one exception type that the command line turns into a one-line message and exit code 2."""


class UserError(Exception):
    """A problem with the user's input (arguments, files, configs) that the user can fix.

    The message is one line that names the problem and, where it can, the fix. The command line prints it
    without a traceback and exits with code 2.
    """
