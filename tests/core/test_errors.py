"""Errors keep the field they name when they cross a process boundary (a worker pool pickles them)."""
import pickle

from ecif_core.errors import ConfigError, ModelSourceError


def test_config_errors_survive_pickling_with_their_field():
    for error in (ConfigError("options.damping", "must be >= 0"), ModelSourceError("model.arch", "needs a download")):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error)
        assert (copy.field, copy.message, str(copy)) == (error.field, error.message, str(error))
