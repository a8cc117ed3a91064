"""The one exception type for problems a user can fix: bad input, a bad setting, a run that cannot go on.

Its message names the file, config field or step and says what to do. `python -m kdep_jax.main` prints
it as one paragraph and exits with status 2; every other exception keeps its traceback, because it is a
bug (here or in a library), not something the user did.
"""


class UserError(ValueError):
    """Bad input or a run that cannot go on; the message says what is wrong and what to do."""


class ConfigError(UserError):
    """A config field that cannot work (a missing path, a batch that does not split over the devices, an
    unknown name); the message names the field (`config.train.batch_size`) and the fix."""
