"""The shipped haproxy.cfg as an operator checks it: `haproxy -c -f haproxy.cfg`, nothing else set."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from spoa.haproxy.process import haproxy_binary

REPO = Path(__file__).resolve().parent.parent


def _without_config_variables() -> dict[str, str]:
    """This process's environment less every variable haproxy.cfg and spoe.conf read."""
    text = (REPO / "haproxy.cfg").read_text() + (REPO / "spoe.conf").read_text()
    names = set(re.findall(r"\$\{(\w+)\}", text)) | set(re.findall(r"presetenv\s+(\w+)", text))
    return {k: v for k, v in os.environ.items() if k not in names}


def test_haproxy_c_passes_on_a_fresh_checkout_from_any_directory(tmp_path: Path) -> None:
    # tmp_path as the working directory: relative paths (spoe.conf, the empty maps) must resolve
    # beside haproxy.cfg, not where haproxy was started.
    res = subprocess.run([haproxy_binary(), "-c", "-f", str(REPO / "haproxy.cfg")], cwd=tmp_path,
                         env=_without_config_variables(), capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
