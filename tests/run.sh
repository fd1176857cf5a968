#!/usr/bin/env bash
# The whole test suite: starts PostgreSQL and NATS if they are not running
# (a current nats-server, see deploy/local/services.sh),
# installs the pinned chart tools (for the pods test, which renders the Helm
# chart) and the pinned coding-agent CLIs (for the agent tests, which run
# them against a stand-in model API), bubblewrap (the agents' sandbox),
# Chromium and its driver (for the
# console's browser tests), then builds and runs every test of the
# workspace against them.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=../deploy/local/services.sh
. deploy/local/services.sh
ensure_postgres
# The suite runs on a nats-server of 2.14 or later: the pinned one where the
# machine's is older (CI runs the broker tests on the machine's as well).
ensure_current_nats
export OMOI_TEST_NATS_URL="$OMOI_CURRENT_NATS_URL"
venv=.ci/.venv
if ! "$venv/bin/python" -c 'import helm_python, openapi_spec_validator, selenium' 2>/dev/null; then
    echo "omoi: installing the pinned tools into $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q -r .ci/requirements.txt
fi
export OMOI_HELM_PYTHON="$PWD/$venv/bin/python"
# The coding-agent CLIs the agent tests drive, at the pinned versions
# (npm ci of deploy/agents into .ci/agents; see deploy/local/services.sh).
ensure_agent_clis
# Executors sandbox their agents with bubblewrap (the sandbox tests require it).
ensure_bubblewrap
# The console's browser tests drive Debian's Chromium over WebDriver.
ensure_chromium
cargo build --workspace --bins
cargo test --workspace "$@"
