"""The one exception every layer raises for bad input (a wrong hook name, a missing file, an
SAE for another model): the CLI prints it as one line and exits with code 2, never a
traceback. It lives alone so that raising it imports nothing else."""


class UserError(Exception):
    """Bad input from the user: reported as one line and exit code 2, never a traceback."""
