"""The HAProxy process wrapper now lives in spoa/haproxy/process.py (product code: `run` uses it).

This name stays for callers written before the move (branches in flight); new code imports
`spoa.haproxy.process`.
"""

from spoa.haproxy.process import (
    HAProxyError,
    HAProxyProcess,
    admin_command,
    haproxy_binary,
    process_alive,
    shipped_config,
    show_info,
)

__all__ = ["HAProxyError", "HAProxyProcess", "admin_command", "haproxy_binary", "process_alive",
           "shipped_config", "show_info"]
