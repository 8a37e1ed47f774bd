# haproxy-swarm: HAProxy (current LTS, official image) + the SPOE agent, supervised by `haproxy-swarm run`.
ARG HAPROXY_IMAGE=haproxy:3.4
FROM ${HAPROXY_IMAGE}

# Numeric ids (hadolint DL3066): 0 is root; 99:99 is haproxy:haproxy in the official image.
USER 0:0
# python3 for the agent, tini as init (signals reach both processes, zombies are reaped).
# Versions come from the base image's Debian release; pinning them would break on its next update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv tini \
    && rm -rf /var/lib/apt/lists/*

COPY pyproject.toml README.md /src/
COPY spoa /src/spoa
# hadolint ignore=DL3013
RUN python3 -m venv /opt/haproxy-swarm \
    && /opt/haproxy-swarm/bin/pip install --no-cache-dir "/src[fast]" \
    && rm -rf /src
COPY haproxy.cfg spoe.conf /etc/haproxy-swarm/
COPY maps /etc/haproxy-swarm/maps
RUN mkdir -p /var/run/haproxy-swarm && chown haproxy:haproxy /var/run/haproxy-swarm

ENV PATH=/opt/haproxy-swarm/bin:$PATH \
    HAPROXY_CONFIG=/etc/haproxy-swarm/haproxy.cfg \
    PYTHONUNBUFFERED=1

USER 99:99
EXPOSE 8099 8888 9101
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["haproxy-swarm", "health"]
# The official image stops with SIGUSR1 (HAProxy's soft-stop); `run` soft-stops HAProxy and stops
# the agent on SIGTERM, and SIGUSR1 would kill it before it could.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["haproxy-swarm", "run"]
