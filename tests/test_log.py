"""The plugin's log lines go through vLLM's own handler, level and format (no server)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vllm_tokenprune.log import logger_name

#: A process as vLLM's own processes set logging up (``configure_logging``), then one INFO line
#: from a plugin logger and one from a logger named as the plugin's were before
#: (``vllm.logger.init_logger("vllm_tokenprune...")``, outside vLLM's logger tree).
CODE = """
from vllm.config.logging import LoggingConfig
from vllm.logger import configure_logging, init_logger
configure_logging(LoggingConfig())
from vllm_tokenprune.log import init_logger as plugin_logger
plugin_logger("vllm_tokenprune.models.fallbacks").info("plugin line %d", 1)
init_logger("vllm_tokenprune.models.fallbacks").info("outside vLLM's tree %d", 2)
"""


@pytest.mark.slow
def test_plugin_info_lines_reach_vllms_handler_in_its_format() -> None:
    res = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True,
                         env={**__import__("os").environ, "VLLM_LOGGING_LEVEL": "INFO"})
    assert res.returncode == 0, res.stderr
    out = res.stdout + res.stderr
    line = next(ln for ln in out.splitlines() if "plugin line 1" in ln)
    assert "INFO" in line and "pid=" in line and "[<string>:" in line  # vLLM's _FORMAT
    assert "outside vLLM's tree 2" not in out  # what the plugin's INFO lines used to do


def test_logger_names_are_in_vllms_tree() -> None:
    name = "vllm_tokenprune.models.fallbacks"
    assert logger_name(name) == "vllm." + name
