# CI only, never pushed: a stand-in for the pinned prom/prometheus image of docker-compose.yml, which no
# registry here serves. Built by .ci/container_check.py FROM the stand-in Debian bookworm base, with Debian's
# prometheus package, and tagged with the compose file's image name. Same contract as the real image:
# entrypoint /bin/prometheus, runs as nobody (65534), data in /prometheus, config at /etc/prometheus/prometheus.yml.
# hadolint ignore=DL3006
ARG BASE=classmeans-ci/bookworm:standin
FROM ${BASE}

# hadolint ignore=DL3008
RUN printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d \
    && apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
    && rm -rf /var/lib/apt/lists/* /usr/sbin/policy-rc.d \
    && { test -x /bin/prometheus || ln -s /usr/bin/prometheus /bin/prometheus; } \
    && mkdir -p /prometheus && chown 65534:65534 /prometheus

USER 65534:65534
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
