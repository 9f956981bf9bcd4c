"""The exceptions that decide the exit status of train.py and test.py (see README: Exit status)."""


class UserError(Exception):
    """The user's input is wrong (config, command line, checkpoint file): exit status 2."""

    exit_code = 2


class ConfigError(UserError):
    """One or more config problems; each is one line of the message."""

    def __init__(self, problems: "list[str] | str"):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class CheckpointError(UserError):
    """A checkpoint file is missing, corrupt, malicious or does not fit the model."""


class TrainingError(Exception):
    """Training failed at run time (non-finite loss or gradient, I/O error while saving): exit 1."""

    exit_code = 1


class Interrupted(Exception):
    """Stopped by SIGINT/SIGTERM after saving a checkpoint: exit 128 + signal number."""

    def __init__(self, signum: int, message: str = ""):
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(message)
