# Engram: multi-stage image. Both stages install their Debian packages with
# scripts/setup.sh, the same script README and CI use, so the image cannot
# drift from what is tested.
#
#   docker build -t engram .
#   docker run -p 50051:50051 -p 9464:9464 -p 8080:8080 -v engram-data:/data engram
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS build
WORKDIR /src
COPY scripts/setup.sh scripts/setup.sh
RUN bash scripts/setup.sh --build && rm -rf /var/lib/apt/lists/*
COPY . .
RUN rm -rf build && bash scripts/build.sh -DENGRAM_BUILD_TESTS=OFF \
    && strip build/server/engramd build/client/engram

FROM ${BASE_IMAGE}
COPY scripts/setup.sh /tmp/setup.sh
RUN bash /tmp/setup.sh --runtime && rm -rf /var/lib/apt/lists/* /tmp/setup.sh \
    && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin engram \
    && mkdir -p /data && chown engram /data
COPY --from=build /src/build/server/engramd /src/build/client/engram /usr/local/bin/
COPY ui /usr/share/engram/ui
USER engram
VOLUME /data
ENV ENGRAM_LISTEN=0.0.0.0:50051 \
    ENGRAM_DATA_DIR=/data \
    ENGRAM_METRICS_LISTEN=0.0.0.0:9464 \
    ENGRAM_HTTP_LISTEN=0.0.0.0:8080 \
    ENGRAM_HTTP_UI_DIR=/usr/share/engram/ui
EXPOSE 50051 9464 8080
# The check follows ENGRAM_LISTEN's port, so a server moved to another port
# (docker run -e ENGRAM_LISTEN=0.0.0.0:7000) still reports healthy.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD engram --target "127.0.0.1:${ENGRAM_LISTEN##*:}" --timeout 4 health
ENTRYPOINT ["engramd"]
