"""The error a user's configuration raises, at the bottom of the import layers so that every
layer can raise it (`infir2_jax.config` re-exports it)."""


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key.

    `key` is the dotted key at fault, where one is: the loader uses it to name the file that
    set that key (a config and its bases are merged before they are parsed).
    """

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key
