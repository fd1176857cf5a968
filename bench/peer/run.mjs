// The peer run of bench/compare.sh: graphile-worker (pinned in
// package.json) with its local queue and batched completion, its
// configuration for throughput. The same shape as omoi-bench's: jobs are
// added in batches of 500 while the worker runs, and the clock runs from the
// first add until every job is done and its row gone. Prints one JSON object.
//
// Usage: DATABASE_URL=postgres://… node run.mjs [jobs] [concurrency]
import { Logger, makeWorkerUtils, run } from "graphile-worker";

const connectionString = process.env.DATABASE_URL;
if (!connectionString) throw new Error("DATABASE_URL is not set");
const jobs = Number(process.argv[2] ?? 20000);
const concurrentJobs = Number(process.argv[3] ?? 24);
const batch = 500;

const utils = await makeWorkerUtils({ connectionString });
await utils.migrate();

let handled = 0;
let allHandled;
const handledAll = new Promise((resolve) => { allHandled = resolve; });
const runner = await run({
  noHandleSignals: true,
  logger: new Logger(() => (level, message) => { if (level === "error") console.error(message); }),
  crontab: "",
  taskList: {
    noop: async () => {
      handled += 1;
      if (handled === jobs) allHandled();
    },
  },
  preset: {
    worker: {
      connectionString,
      concurrentJobs,
      maxPoolSize: concurrentJobs + 2,
      pollInterval: 1000,
      localQueue: { size: 500 },
      completeJobBatchDelay: 0,
      failJobBatchDelay: 0,
    },
  },
});

const started = performance.now();
for (let sent = 0; sent < jobs; sent += batch) {
  const n = Math.min(batch, jobs - sent);
  await utils.addJobs(Array.from({ length: n }, (_, i) => ({ identifier: "noop", payload: { i: sent + i } })));
}
const enqueued = performance.now();
await handledAll;
// Completions are batched: done means the rows are gone.
for (;;) {
  const { rows } = await utils.withPgClient((c) => c.query("select count(*)::int as n from graphile_worker._private_jobs"));
  if (rows[0].n === 0) break;
  await new Promise((r) => setTimeout(r, 5));
}
const finished = performance.now();
await runner.stop();
await utils.release();
console.log(JSON.stringify({
  peer: "graphile-worker 0.18.0",
  jobs,
  concurrent_jobs: concurrentJobs,
  enqueue_jobs_per_s: Math.round(jobs / ((enqueued - started) / 1000)),
  end_to_end_jobs_per_s: Math.round(jobs / ((finished - started) / 1000)),
}));
