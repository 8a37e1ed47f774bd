"""Real parts as local processes on loopback: HAProxy with the shipped config, dnsmasq, HTTP backends.

Used by the demo, the end-to-end tests and bench/; never by the product itself (`run` takes its
HAProxy process wrapper from spoa/haproxy/process.py, as this kit does). Nothing here is mocked.
"""
