"""Keep library chatter (tqdm bars of lm-eval, mergekit, transformers, datasets; their logs below ERROR) out
of a Rich display. evoforge's own warnings (compatibility, kinship) are printed by evoforge, not logged."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

NOISY_LOGGERS = ("lm-eval", "lm_eval", "mergekit", "multimerge", "datasets", "transformers", "accelerate")


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Every tqdm bar disabled (lm-eval passes `disable=` explicitly, so TQDM_DISABLE alone is not enough),
    noisy loggers at ERROR (their warnings are advice for their own CLIs)."""
    import tqdm
    from transformers.utils import logging as hf_logging

    original_init = tqdm.tqdm.__init__

    def silent_init(self, *args, **kwargs):
        kwargs["disable"] = True
        original_init(self, *args, **kwargs)

    tqdm.tqdm.__init__ = silent_init
    previous_env = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    levels = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        tqdm.tqdm.__init__ = original_init
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()
        if previous_env is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = previous_env
