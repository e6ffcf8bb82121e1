"""NVIDIA's measuring tools in their own environment: perf_analyzer and Model Analyzer.

`make tools-env` creates ``.venv-tools`` (see the Makefile for why tritonclient 2.41.1): the
``perf_analyzer`` binary of that wheel, ``model-analyzer``, and in ``lib/native`` the two shared
libraries the binary needs (libb64 and libcudart; no GPU is needed). :func:`find_tools` checks
all of it and says what is missing; :attr:`Tools.env` is the environment to run either tool in.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from hrnet_core.errors import HrnetTritonError

TOOLS_ENV_VARIABLE = "HRNET_TRITON_TOOLS_ENV"


class ToolsMissing(HrnetTritonError):
    """The tools environment is absent or cannot run perf_analyzer."""


@dataclass(frozen=True)
class Tools:
    root: Path

    @property
    def perf_analyzer(self) -> Path:
        return self.root / "bin" / "perf_analyzer"

    @property
    def model_analyzer(self) -> Path:
        return self.root / "bin" / "model-analyzer"

    @property
    def env(self) -> dict[str, str]:
        """This process's environment with the tools' bin first on PATH and their native libraries found."""
        env = dict(os.environ)
        native = str(self.root / "lib" / "native")
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (native, env.get("LD_LIBRARY_PATH", "")) if p)
        env["PATH"] = f"{self.root / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        return env

    def perf_analyzer_version(self) -> str:
        """``perf_analyzer --version``'s line; raises :class:`ToolsMissing` if the binary cannot start."""
        try:
            done = subprocess.run(
                [str(self.perf_analyzer), "--version"], env=self.env, capture_output=True, text=True, timeout=30
            )
        except OSError as err:
            raise ToolsMissing(f"{self.perf_analyzer} cannot run ({err}); recreate it with `make tools-env`") from err
        if done.returncode != 0:
            detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ToolsMissing(
                f"{self.perf_analyzer} does not start: {detail[0]}. It needs libb64.so.0d and libcudart.so.12 "
                f"in {self.root / 'lib' / 'native'}; `make tools-env` puts them there (libb64 needs apt-get)."
            )
        return (done.stdout or done.stderr).strip()


def default_tools_env() -> Path:
    """``$HRNET_TRITON_TOOLS_ENV``, else ``.venv-tools`` beside the running interpreter's venv."""
    env = os.environ.get(TOOLS_ENV_VARIABLE)
    return Path(env) if env else Path(sys.prefix).parent / ".venv-tools"


def find_tools(root: Path | None = None) -> Tools:
    """The tools environment at ``root`` (default :func:`default_tools_env`), checked to run perf_analyzer."""
    tools = Tools(Path(root) if root else default_tools_env())
    for binary in (tools.perf_analyzer, tools.model_analyzer):
        if not binary.exists():
            raise ToolsMissing(f"{binary} is missing: create the tools environment with `make tools-env`")
    tools.perf_analyzer_version()
    return tools
