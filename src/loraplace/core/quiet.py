"""The libraries' own chatter off, in every process loraplace starts (CLI, server, runs).

    quiet_libraries()   # before the ML stack is imported, where it can be

Transformers' progress bars and warnings that repeat for every run go. So do two warnings
bitsandbytes gives at import on CPUs with AVX-512 BF16 (it tries to fetch an optional 4-bit
kernel from the Hugging Face hub through `kernels`, and says so when it cannot): they printed
before every error message of the CLI on such machines, and loraplace only uses bitsandbytes
when `quantize` asks for it, where its own CPU path runs without that kernel.
"""

from __future__ import annotations

import logging
import os
import warnings

# Loggers whose warnings are about optional downloads, not the user's study.
SILENT_LOGGERS = ("bitsandbytes", "kernels")


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in SILENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
