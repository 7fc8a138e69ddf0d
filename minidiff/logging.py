"""How much minidiff says. The course calls transformers' `logging.set_verbosity_error()`; here it silences
minidiff's warnings (an ignored config key, a prompt cut to 77 tokens), all of class MinidiffWarning, and
set_verbosity_warning() shows them again (the default). They go through Python's warnings module, so these two
add or remove one filter."""

import warnings


class MinidiffWarning(UserWarning):
    """Something minidiff did on the user's behalf that they may not expect (and may silence)."""


def set_verbosity_error() -> None:
    """Only errors from now on: minidiff's warnings are not shown."""
    warnings.filterwarnings("ignore", category=MinidiffWarning)


def set_verbosity_warning() -> None:
    """minidiff's warnings are shown again."""
    warnings.filters[:] = [f for f in warnings.filters if not (f[0] == "ignore" and f[2] is MinidiffWarning)]
