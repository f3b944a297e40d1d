"""The data exceptions, in a module of their own so that `pipeline` and `npz` can both raise
them without importing each other; `pipeline` re-exports them."""


class DatasetUnavailableError(RuntimeError):
  """The dataset is neither prepared in the data dir nor preparable here (offline, no TF)."""


class InvalidDatasetError(DatasetUnavailableError, ValueError):
  """A dataset file that cannot be used as configured: missing, unreadable, malformed, or not
  the image size / channels / classes that config.model describes."""
