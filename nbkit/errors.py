"""The error every layer raises for a wrong config file or value (re-exported by :mod:`nbkit.config`)."""


class ConfigError(ValueError):
    """A config file or value is wrong; the message names the file, the key and the fix."""
