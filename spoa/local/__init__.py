"""Real parts as local processes on loopback: HAProxy with the shipped config, dnsmasq, HTTP backends.

Used by `haproxy-swarm run` (HAProxy), the demo and the end-to-end tests. Nothing here is mocked.
"""
