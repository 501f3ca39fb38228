# The build stage's image: Node.js and the toolchain node-gyp needs for native addons (zstd-napi).
# ca/ holds the extra CA certificates of a TLS-inspecting proxy on the way to the npm registry (may
# be empty); only this build-stage image trusts them.
ARG NODE_IMAGE=cloudlet-handoff/node:20
FROM ${NODE_IMAGE}
COPY ca/ /usr/local/share/ca-certificates/
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 make g++ ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && update-ca-certificates
ENV NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt
