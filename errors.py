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


def one_line(message: str) -> str:
    """One line per problem, even when a library's message spans several. An error re-raised from a
    DataLoader worker carries the worker's traceback: keep only the original message, its last line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if "Original Traceback" in message and lines:
        name, _, text = lines[-1].partition(": ")
        return text if text and name.rsplit(".", 1)[-1].endswith("Error") else lines[-1]
    return " ".join(lines)


def problem_lines(exc: Exception) -> list[str]:
    """What train.py and test.py print for an error, one line per problem."""
    problems = exc.problems if isinstance(exc, ConfigError) else [str(exc)]
    return [one_line(str(problem)) for problem in problems]
