#!/usr/bin/env bash
# omoi's queue against its peer, on the same PostgreSQL, in one run:
# omoi-bench (enqueue over gRPC, dispatch over WatchAssignments, StartTask,
# CompleteTask, four events per task on JetStream) and graphile-worker
# (pinned in bench/peer, local queue and batched completion), each on a
# fresh database; Temporal, the durable-execution peer (its dev server on a
# SQLite file in WAL mode with full sync, a Python SDK worker running no-op
# activities: bench/temporal, pinned in its requirements.txt); then omoi
# paced at 1,000 tasks/s for its dispatch latency. Prints the figures and
# both ratios.
#
#   bash bench/compare.sh [--tasks N] [--runs K]
#
# DATABASE_URL names the server (any database on it; default the local
# one), NATS_URL the broker (default a current local one, see above).
set -euo pipefail
cd "$(dirname "$0")/.."

tasks=20000
runs=1
while [ $# -gt 0 ]; do
    case "$1" in
        --tasks) tasks="$2"; shift 2 ;;
        --runs) runs="$2"; shift 2 ;;
        *) echo "usage: bash bench/compare.sh [--tasks N] [--runs K]" >&2; exit 2 ;;
    esac
done

# shellcheck source=../deploy/local/services.sh
. deploy/local/services.sh
if [ -z "${DATABASE_URL:-}" ]; then ensure_postgres; fi
# A current nats-server: the machine's when it is 2.14 or later, else the
# pinned one (deploy/local/services.sh).
if [ -z "${NATS_URL:-}" ]; then ensure_current_nats; fi
server="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
server="${server%/*}"
export NATS_URL="${NATS_URL:-$OMOI_CURRENT_NATS_URL}"

cargo build --release --locked -q -p omoi-bench --bin omoi-bench
if ! cmp -s bench/peer/package-lock.json bench/peer/node_modules/.omoi-installed 2>/dev/null; then
    (cd bench/peer && npm ci --no-audit --no-fund --loglevel=error && cp package-lock.json node_modules/.omoi-installed)
fi
temporal_venv=bench/temporal/.venv
if ! cmp -s bench/temporal/requirements.txt "$temporal_venv/.omoi-installed" 2>/dev/null; then
    python3 -m venv "$temporal_venv"
    "$temporal_venv/bin/pip" install -q -r bench/temporal/requirements.txt
    cp bench/temporal/requirements.txt "$temporal_venv/.omoi-installed"
fi

# A fresh database on the server for one run; its URL.
fresh() {
    local name="omoi_bench_$1_$$"
    psql -q -d "$server/postgres" -c "DROP DATABASE IF EXISTS $name" -c "CREATE DATABASE $name" >/dev/null
    echo "$server/$name"
}
drop() { psql -q -d "$server/postgres" -c "DROP DATABASE IF EXISTS ${1##*/}" >/dev/null; }
field() { python3 -c 'import json,sys; print(json.loads(sys.stdin.read())[sys.argv[1]])' "$1"; }

for run in $(seq 1 "$runs"); do
    url=$(fresh omoi)
    omoi=$(DATABASE_URL="$url" OMOI_EVENTS_STREAM="OMOI_BENCH_$$" OMOI_SUBJECT_PREFIX="omoibench$$" RUST_LOG=warn \
        target/release/omoi-bench --spawn --drop-stream --json --tasks "$tasks" --agents 8 | grep "^{")
    drop "$url"
    url=$(fresh peer)
    peer=$(DATABASE_URL="$url" node bench/peer/run.mjs "$tasks" | grep "^{")
    drop "$url"
    # At most 2,000 activities: past a few hundred a workflow, its history's
    # replays slow it (20,000 took 7 minutes, at 49 activities/s).
    temporal=$(PATH="$PWD/$temporal_venv/bin:$PATH" "$temporal_venv/bin/python" bench/temporal/run.py \
        "$(( tasks < 2000 ? tasks : 2000 ))" 2>/dev/null | grep "^{")
    url=$(fresh paced)
    paced=$(DATABASE_URL="$url" OMOI_EVENTS_STREAM="OMOI_BENCH_$$" OMOI_SUBJECT_PREFIX="omoibench$$" RUST_LOG=warn \
        target/release/omoi-bench --spawn --drop-stream --json --tasks 10000 --agents 8 --rate 1000 | grep "^{")
    drop "$url"
    ours=$(field end_to_end_tasks_per_s <<<"$omoi")
    theirs=$(field end_to_end_jobs_per_s <<<"$peer")
    echo "run $run of $runs ($tasks tasks; $(nproc) cores; PostgreSQL $(psql -d "$server/postgres" -Atc 'SHOW server_version'); nats-server $(field nats_server <<<"$omoi"))"
    echo "  omoi            $ours tasks/s end to end (enqueue $(field enqueue_tasks_per_s <<<"$omoi")/s; $(field events_published <<<"$omoi") events)"
    echo "  graphile-worker $theirs jobs/s end to end (enqueue $(field enqueue_jobs_per_s <<<"$peer")/s)"
    python3 -c "import sys; print(f'  ratio           {float(sys.argv[1]) / float(sys.argv[2]):.2f}x')" "$ours" "$theirs"
    fanned=$(field fan_out_activities_per_s <<<"$temporal")
    echo "  temporal        $fanned activities/s fanned out from 4 workflows ($(field fan_out_activities <<<"$temporal") activities), $(field one_activity_workflows_per_s <<<"$temporal") one-activity workflows/s; $(field store <<<"$temporal")"
    python3 -c "import sys; print(f'  ratio           {float(sys.argv[1]) / float(sys.argv[2]):.1f}x temporal (tasks/s over fanned-out activities/s)')" "$ours" "$fanned"
    echo "  paced 1000/s    enqueue $(field enqueue_tasks_per_s <<<"$paced")/s, dispatch p50 $(field dispatch_p50_ms <<<"$paced") ms, p90 $(field dispatch_p90_ms <<<"$paced") ms, p99 $(field dispatch_p99_ms <<<"$paced") ms"
done
