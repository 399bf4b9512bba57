# nats-server from Debian's package, for the container test's replicas
# compose override (tests/docker/replicas.test.yml), where the nats image of
# deploy/replicas/docker-compose.yml cannot be pulled.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nats-server \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data
VOLUME /data
EXPOSE 4222 6222
ENTRYPOINT ["/usr/sbin/nats-server"]
