"""The product does not depend on its test kit (issue 13, item 4).

`haproxy-swarm run`, `agent`, `status` and `health` are what the image runs; spoa/local is the kit
that runs real parts on loopback for the demo and the tests. Importing the product's modules in a
fresh interpreter must not load any of spoa/local.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)

PRODUCT_MODULES = ["spoa.cli", "spoa.supervisor", "spoa.app", "spoa.status", "spoa.haproxy.process"]


@pytest.mark.parametrize("module", PRODUCT_MODULES)
def test_product_module_loads_nothing_from_the_local_kit(module: str) -> None:
    code = (f"import sys, importlib; importlib.import_module({module!r}); "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('spoa.local'))))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "", f"{module} loads the local kit: {res.stdout.strip()}"


def test_the_local_kit_uses_the_product_process_wrapper() -> None:
    """One HAProxy process wrapper: the kit's names are the product's objects, not copies."""
    from spoa.haproxy import process
    from spoa.local import stack

    assert stack.show_info is process.show_info
    assert stack.admin_command is process.admin_command


def test_haproxy_bin_selects_the_binary(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    """HAPROXY_BIN (commit 4d60bd9) still picks the binary `run` starts, from its new home."""
    from spoa.haproxy.process import HAProxyProcess, haproxy_binary

    monkeypatch.setenv("HAPROXY_BIN", "/opt/haproxy-x/sbin/haproxy")
    assert haproxy_binary() == "/opt/haproxy-x/sbin/haproxy"
    assert HAProxyProcess({"RUN_DIR": str(tmp_path)}).binary == "/opt/haproxy-x/sbin/haproxy"
    assert HAProxyProcess({"RUN_DIR": str(tmp_path)}, binary="/usr/sbin/haproxy").binary == "/usr/sbin/haproxy"
    monkeypatch.delenv("HAPROXY_BIN")
    assert haproxy_binary().endswith("haproxy")
