"""Temporal, the durable-execution peer of bench/compare.sh: its dev server
(`temporal server start-dev`, Temporal Server in one process) on a SQLite
file in WAL mode with full sync, and a Python SDK worker (unsandboxed
workflows) running no-op activities on one task queue. Measures, on a fresh database each:

- fan-out: four workflows each running N/4 activities at once (the
  activities are the tasks), activities per second from the first start
  to the last workflow's end;
- one activity per workflow: N/10 workflows started at once, each running
  one activity, workflows per second.

Prints one JSON line. Usage: python bench/temporal/run.py TASKS"""

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta

from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

QUEUE = "omoi-bench"


@activity.defn
async def noop(i: int) -> int:
    return i


# Activities a workflow schedules in one go: thousands in one workflow task
# outlast the SDK's two-second deadlock detection, so they go out in waves
# (a durable 1 ms timer between two), all of them running at once.
WAVE = 500


@workflow.defn
class FanOut:
    @workflow.run
    async def run(self, n: int) -> int:
        running = []
        for start in range(0, n, WAVE):
            running.extend(asyncio.ensure_future(
                workflow.execute_activity(noop, i, start_to_close_timeout=timedelta(minutes=5)))
                for i in range(start, min(n, start + WAVE)))
            if start + WAVE < n:
                await workflow.sleep(timedelta(milliseconds=1))
        return len(await asyncio.gather(*running))


@workflow.defn
class One:
    @workflow.run
    async def run(self, i: int) -> int:
        return await workflow.execute_activity(noop, i, start_to_close_timeout=timedelta(minutes=5))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server(db):
    """The dev server on `db` (WAL, full sync); its address and process."""
    port = free_port()
    temporal = shutil.which("temporal") or os.path.join(os.path.dirname(sys.executable), "temporal")
    proc = subprocess.Popen(
        [temporal, "server", "start-dev", "--headless", "--ip", "127.0.0.1", "--port", str(port),
         "--db-filename", db, "--sqlite-pragma", "journal_mode=wal", "--sqlite-pragma", "synchronous=FULL",
         "--log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return f"127.0.0.1:{port}", proc


async def connect(address):
    deadline = time.monotonic() + 60
    while True:
        try:
            return await Client.connect(address)
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def timed(tasks, make):
    """Runs `make(client)` against a fresh server with a worker; seconds."""
    with tempfile.TemporaryDirectory() as d:
        address, proc = server(os.path.join(d, "temporal.db"))
        try:
            client = await connect(address)
            # Unsandboxed: the faster way to run workflow code in Python.
            async with Worker(client, task_queue=QUEUE, workflows=[FanOut, One], activities=[noop],
                              max_concurrent_activities=200, max_concurrent_workflow_tasks=200,
                              workflow_runner=UnsandboxedWorkflowRunner()):
                started = time.monotonic()
                await make(client)
                return time.monotonic() - started
        finally:
            proc.terminate()
            proc.wait()


async def main(tasks):
    per = max(1, tasks // 4)

    async def fan_out(client):
        handles = [await client.start_workflow(FanOut.run, per, id=f"fan-{w}", task_queue=QUEUE) for w in range(4)]
        await asyncio.gather(*(h.result() for h in handles))

    fan = await timed(tasks, fan_out)
    ones = max(1, tasks // 10)

    async def one_each(client):
        handles = await asyncio.gather(*(client.start_workflow(One.run, i, id=f"one-{i}", task_queue=QUEUE)
                                         for i in range(ones)))
        await asyncio.gather(*(h.result() for h in handles))

    one = await timed(ones, one_each)
    print(json.dumps({
        "fan_out_activities": 4 * per,
        "fan_out_activities_per_s": round(4 * per / fan, 1),
        "one_activity_workflows": ones,
        "one_activity_workflows_per_s": round(ones / one, 1),
        "store": "sqlite file, journal_mode=wal, synchronous=FULL",
    }))


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000))
