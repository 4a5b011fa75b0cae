# graphdelta: multi-stage build, small non-root runtime image.
#   docker build -t graphdelta .
#   docker run --rm -v $PWD/connectors:/etc/graphdelta:ro -e GRAPH_CLIENT_SECRET graphdelta run --config /etc/graphdelta/users-to-kafka.toml

FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake libcurl4-openssl-dev libssl-dev libsasl2-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY src src
RUN cargo build --release --locked --bin graphdelta \
 && strip target/release/graphdelta

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 libcurl4 libsasl2-2 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/graphdelta --create-home graphdelta
COPY --from=build /src/target/release/graphdelta /usr/local/bin/graphdelta
USER 10001:10001
WORKDIR /var/lib/graphdelta
ENV GRAPHDELTA_LOG_FORMAT=json
EXPOSE 9464
ENTRYPOINT ["graphdelta"]
CMD ["run", "--config", "/etc/graphdelta/connector.toml"]
