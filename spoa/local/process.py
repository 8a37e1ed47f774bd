"""`stop_process` now lives in spoa/haproxy/process.py (product code: `run` uses it).

This name stays for callers written before the move (branches in flight); new code imports
`spoa.haproxy.process`.
"""

from spoa.haproxy.process import stop_process

__all__ = ["stop_process"]
