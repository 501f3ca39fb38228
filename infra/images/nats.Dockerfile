# Debian's nats-server, started like the official image (`command: ["-c", conf]`); wget for the
# compose health check.
ARG BASE_IMAGE=cloudlet-handoff/debian:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nats-server wget \
 && rm -rf /var/lib/apt/lists/* \
 && nats-server --version
EXPOSE 4222 7422 8222
ENTRYPOINT ["nats-server"]
