"""The plugin's loggers, inside vLLM's logging namespace (pure Python, no vLLM import until a
logger is made; every process).

vLLM configures one handler, on its ``vllm`` logger, which does not propagate
(``vllm.logger.DEFAULT_LOGGING_CONFIG``; ``VLLM_LOGGING_LEVEL``, ``VLLM_LOGGING_CONFIG_PATH``
and ``--log-config-file`` change it). A logger named ``vllm_tokenprune.*`` sits outside that
tree: its records reach only Python's last-resort handler, which drops everything below
WARNING and ignores vLLM's format. :func:`init_logger` names each plugin logger
``vllm.vllm_tokenprune.<module>``, a child of ``vllm``, so the plugin's lines go through vLLM's
handler, level and format (and through whatever logging configuration the user gave vLLM).
"""

from __future__ import annotations

from typing import Any

#: Prefix of every plugin logger: vLLM's own logger tree.
PARENT = "vllm"


def logger_name(module: str) -> str:
    """The logger name of one of the plugin's modules (``__name__``)."""
    return f"{PARENT}.{module}"


def init_logger(module: str) -> Any:
    """``vllm.logger.init_logger`` for one of the plugin's modules (pass ``__name__``)."""
    from vllm.logger import init_logger as vllm_init_logger

    return vllm_init_logger(logger_name(module))
