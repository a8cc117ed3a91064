"""The one exception the input pipeline raises for bad input, so callers can catch it apart from bugs."""

from kdep_jax.errors import UserError


class DataError(UserError):
    """Bad or missing input data; the message names the file, dataset or setting and says what to do."""
