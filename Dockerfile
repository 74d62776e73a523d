# Builds Tally's executables (multi-stage: a Swift builder, then a slim Debian runtime).
#   docker build -t tally .
ARG SWIFT_VERSION=6.1
FROM swift:${SWIFT_VERSION}-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends librdkafka-dev libpq-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# The manifest and sources; test folders too, since the manifest names them.
COPY Package.swift ./
COPY Sources ./Sources
COPY Tests ./Tests
# Static Swift runtime: the runtime image needs librdkafka, libpq and libcurl (HTTP clients: tally emit, the gateway).
RUN swift build -c release --static-swift-stdlib \
        --product tally --product tally-ingest --product tally-aggregator --product tally-rater \
    && mkdir /out \
    && cp .build/release/tally .build/release/tally-ingest .build/release/tally-aggregator .build/release/tally-rater /out/ \
    && cp -R .build/release/*.resources /out/

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends librdkafka1 libpq5 libcurl4 ca-certificates tzdata \
    && rm -rf /var/lib/apt/lists/* && useradd --system --uid 10001 tally
# The executables and their resource bundles (the SQL migrations) side by side.
COPY --from=build /out/ /usr/local/bin/
COPY examples /usr/local/share/tally/examples
USER tally
EXPOSE 8080 9464
CMD ["tally", "--help"]
