# syntax=docker/dockerfile:1
# Images of omoi. Two runtime targets:
#   runtime   omoi-ticket, omoi-task-queue, omoi-health, omoi-console and omoi (non-root, minimal)
#   executor  omoi-executor and omoi-demo-agent, plus git for repository checkouts and
#             the coding-agent CLIs (Claude Code, Codex, Gemini CLI) at the versions
#             pinned in deploy/agents/package-lock.json
# Build: docker build --target runtime -t omoi . && docker build --target executor -t omoi-executor .

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins \
 && mkdir -p /out \
 && cp target/release/omoi target/release/omoi-ticket target/release/omoi-task-queue \
       target/release/omoi-health target/release/omoi-console target/release/omoi-executor \
       target/release/omoi-demo-agent /out/

FROM debian:bookworm-slim AS base
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 omoi \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin omoi

FROM base AS runtime
COPY --from=build /out/omoi /out/omoi-ticket /out/omoi-task-queue /out/omoi-health /out/omoi-console /usr/local/bin/
USER 10001:10001
EXPOSE 50051 50052 50053 8080
ENTRYPOINT ["/usr/local/bin/omoi-task-queue"]

FROM node:22-bookworm-slim AS agents
WORKDIR /opt/omoi-agents
COPY deploy/agents/package.json deploy/agents/package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund

FROM base AS executor
RUN apt-get update \
 && apt-get install -y --no-install-recommends git openssh-client \
 && rm -rf /var/lib/apt/lists/*
COPY --from=agents /usr/local/bin/node /usr/local/bin/node
COPY --from=agents /opt/omoi-agents /opt/omoi-agents
COPY --from=build /out/omoi-executor /out/omoi-demo-agent /usr/local/bin/
USER 10001:10001
ENV OMOI_WORKSPACE_ROOT=/workspaces HOME=/tmp PATH=/opt/omoi-agents/node_modules/.bin:$PATH
EXPOSE 50054
ENTRYPOINT ["/usr/local/bin/omoi-executor"]
