"""The errors a user's configuration or checkpoint raises, at the bottom of the import layers
so that every layer can raise them and a command can catch them without importing JAX
(`infir2_jax.config` re-exports ConfigError, `infir2_jax.checkpoint` CheckpointError)."""


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key.

    `key` is the dotted key at fault, where one is: the loader uses it to name the file that
    set that key (a config and its bases are merged before they are parsed).
    """

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


class CheckpointError(ValueError):
    """A checkpoint on disk does not match what the model expects (names the tensor/file)."""
