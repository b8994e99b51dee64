"""Where the engines' own log lines go: vLLM writes hundreds of INFO and WARNING lines per engine start (and its
engine processes write theirs too), which would bury `trace gen`'s progress bar. They go to ``DIR/logs/vllm.log``
in the trace folder; errors still reach the terminal.

vLLM reads its logging setup when it is imported, in every process it starts, from the file that
``VLLM_LOGGING_CONFIG_PATH`` names: ``route_engine_logs`` writes that file and sets the variable before an engine
starts (its processes inherit it), and applies the same setup to this process (where vLLM may be imported
already). Python warnings raised while the engines run go to the same file.
"""

from __future__ import annotations

import json
import logging
import logging.config
import os
from pathlib import Path

LOG_FOLDER = "logs"
LOG_FILE = "vllm.log"
CONFIG_FILE = "vllm-logging.json"
ENGINE_LOGGERS = ("vllm", "py.warnings")


def logging_config(log_file: Path) -> dict:
    """A logging.config dictionary: the engine loggers' records to ``log_file``, errors also to stderr."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"engine": {"format": "%(asctime)s %(levelname)s pid=%(process)d %(name)s: %(message)s"}},
        "handlers": {
            "file": {"class": "logging.FileHandler", "filename": str(log_file), "formatter": "engine", "delay": True},
            "terminal": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "level": "ERROR",
                "formatter": "engine",
            },
        },
        "loggers": {
            name: {"handlers": ["file", "terminal"], "level": "INFO", "propagate": False} for name in ENGINE_LOGGERS
        },
    }


def route_engine_logs(trace_dir: str | os.PathLike, backend: str | None) -> Path | None:
    """Send the engines' log lines to ``trace_dir``/logs/vllm.log from now on (this process and those it starts)
    when ``backend`` is vLLM or may be (None: the default backend); returns the log file, or None."""
    if backend not in (None, "vllm") or not Path(trace_dir).is_dir():
        return None
    folder = Path(trace_dir) / LOG_FOLDER
    folder.mkdir(exist_ok=True)
    log_file = folder / LOG_FILE
    config = logging_config(log_file.resolve())
    config_file = folder / CONFIG_FILE
    config_file.write_text(json.dumps(config, indent=1) + "\n")
    os.environ["VLLM_CONFIGURE_LOGGING"] = "1"
    os.environ["VLLM_LOGGING_CONFIG_PATH"] = str(config_file.resolve())
    logging.config.dictConfig(config)
    logging.captureWarnings(True)
    return log_file
