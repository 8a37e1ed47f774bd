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

# The Python dependencies are pinned with their hashes (requirements-image.txt, made by pip-compile
# from pyproject.toml, see docs/verification.md): two builds of one commit install the same files.
# The package itself then goes in without resolving anything (--no-deps, --no-build-isolation: its
# build backend is pinned in the lock too), and `pip check` proves the lock satisfies pyproject.toml.
COPY pyproject.toml README.md requirements-image.txt /src/
COPY spoa /src/spoa
RUN python3 -m venv /opt/haproxy-swarm \
    && /opt/haproxy-swarm/bin/pip install --no-cache-dir --require-hashes --only-binary :all: \
        -r /src/requirements-image.txt \
    && /opt/haproxy-swarm/bin/pip install --no-cache-dir --no-deps --no-build-isolation /src \
    && /opt/haproxy-swarm/bin/pip check \
    && rm -rf /src
COPY haproxy.cfg spoe.conf ondemand.conf /etc/haproxy-swarm/
COPY maps /etc/haproxy-swarm/maps
# ACME_DIR's default: a named volume mounted there starts as this directory, owned by uid 99.
RUN mkdir -p /var/run/haproxy-swarm /var/lib/haproxy-swarm/acme \
    && chown haproxy:haproxy /var/run/haproxy-swarm /var/lib/haproxy-swarm/acme
# The build fails on a config this image's HAProxy rejects (defaults from the config's presetenv lines,
# the same check as docs/verification.md's `haproxy -c`).
RUN haproxy -c -f /etc/haproxy-swarm/haproxy.cfg

ENV PATH=/opt/haproxy-swarm/bin:$PATH \
    HAPROXY_CONFIG=/etc/haproxy-swarm/haproxy.cfg \
    PYTHONUNBUFFERED=1

USER 99:99
# 8443: HTTPS, only when TLS_CERT names a certificate or ACME_DOMAINS names (docs/operator-guide.md, "HTTPS").
EXPOSE 8099 8443 8888 9101
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["haproxy-swarm", "health"]
# The official image stops with SIGUSR1 (HAProxy's soft-stop); `run` soft-stops HAProxy and stops
# the agent on SIGTERM, and SIGUSR1 would kill it before it could.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["haproxy-swarm", "run"]
