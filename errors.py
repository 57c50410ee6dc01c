"""
errors.py: a bad input ends a script with one line that names it and says what to do, never a traceback.

    with errors.one_line_errors("eval.py"):    # every entry point wraps its main in this
        ...

Each library module raises its own error type (settings.SettingsError, loading.LoadError, model.ModelError, ...);
this module is the one place that gathers them, so it imports them all and nothing imports it but the entry points
(a library module collecting the others' errors would import them in a circle).
"""
import contextlib

import evaluation
import loading
import lora
import settings
import training
from data import DataError
from data.download import DownloadError
from model import ModelError

# the exception types that mean a bad input (a message for the user), not a bug (a traceback for us)
USER_ERRORS = (settings.SettingsError, loading.LoadError, ModelError, lora.AdapterError, DataError, DownloadError,
               evaluation.EvalError, training.TrainError)


@contextlib.contextmanager
def one_line_errors(prog):
    """Turn a bad-input error raised inside the block into `prog: error: message` and exit status 2."""
    try:
        yield
    except USER_ERRORS as e:
        settings.die(prog, " ".join(str(e).split()))
