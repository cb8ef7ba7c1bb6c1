"""The one base class of expected failures: bad input or an unusable service, with a message for the user.

Jobs print such an error as one line and exit non-zero; anything else is a bug and keeps its traceback. The
module imports nothing, so a job can catch these without importing Ray or MLflow first.
"""


class PipelineError(Exception):
    """An expected failure whose message names the file, URL or field at fault and how to fix it."""


class LoaderError(ValueError):
    """The data cannot feed the requested configuration, or a shard is damaged (the message names it).

    Defined here, not in the loader, so that Ray Train's controller can unpickle a worker's LoaderError (and
    tell it from a lost worker) without importing the loader's torchvision and webdataset."""
