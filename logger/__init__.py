from logger.logging import get_logger, log_file_only, setup_logging
from logger.progress import Progress
from logger.tensorboard import NullWriter, make_writer

__all__ = ["NullWriter", "Progress", "get_logger", "log_file_only", "make_writer", "setup_logging"]
