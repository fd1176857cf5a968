//! omoi-publish-bench: the three ways the outbox relay could put events on
//! JetStream, side by side on one nats-server: every message on its own
//! (many in flight, each acknowledged: what the relay does), atomic
//! batches (`allow_atomic`, nats-server 2.12+) and fast-ingest batches
//! (`allow_batched`, 2.14+, flow-controlled). Each mode publishes the same
//! messages (event-sized, four subjects, a `Nats-Msg-Id` each) to a stream
//! of its own with the events stream's settings, in batches of the relay's
//! size; it reports messages/s, the server's CPU per message (with
//! --server-pid) and, publishing the first batch again, what the stream
//! does with a batch of copies (a relay republishing after a crash).
//! BENCHMARKS.md has the figures that keep the relay publishing one by one.

use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};
use clap::Parser;
use futures::StreamExt;
use futures::future::join_all;
use omoi_bench::soak::cpu_seconds;

/// A message to publish.
#[derive(Debug, Clone)]
struct Outgoing {
    subject: String,
    headers: HeaderMap,
    payload: bytes::Bytes,
}

/// The most messages the server takes in one atomic batch.
const MOST_IN_A_BATCH: usize = 1000;

#[derive(Debug, Parser)]
#[command(
    name = "omoi-publish-bench",
    about = "Per-message, atomic and fast-ingest JetStream publishing, compared"
)]
struct Args {
    /// Messages per mode.
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
    /// Messages per batch (the relay takes about 500 events at a time).
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Payload bytes per message (an event is 200-400).
    #[arg(long, default_value_t = 300)]
    size: usize,
    /// The nats-server's pid, to report its CPU per message.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Modes to run, in order.
    #[arg(long, value_delimiter = ',', default_value = "each,atomic,fast")]
    modes: Vec<Mode>,
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    Each,
    Atomic,
    Fast,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.batch > 0 && args.batch <= MOST_IN_A_BATCH,
        "--batch must be 1..=1000"
    );
    let client = async_nats::connect(&args.nats_url).await?;
    let js = jetstream::new(client.clone());
    println!(
        "omoi-publish-bench: {} messages of {} bytes per mode, batches of {}, nats-server {}",
        args.messages,
        args.size,
        args.batch,
        client.server_info().version
    );
    for mode in &args.modes {
        let run = format!("PUBBENCH_{}", uuid::Uuid::new_v4().simple());
        let prefix = run.to_lowercase();
        js.create_stream(stream::Config {
            name: run.clone(),
            subjects: vec![format!("{prefix}.>")],
            storage: stream::StorageType::File,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await?;
        match mode {
            Mode::Each => {}
            Mode::Atomic => allow(&client, &run, "allow_atomic").await?,
            Mode::Fast => allow(&client, &run, "allow_batched").await?,
        }
        let messages: Vec<Outgoing> = (0..args.messages).map(|i| message(&prefix, i, args.size)).collect();
        let cpu_before = args.server_pid.map(cpu_seconds);
        let started = Instant::now();
        for batch in messages.chunks(args.batch) {
            send(&js, &client, *mode, batch.to_vec()).await?;
        }
        let secs = started.elapsed().as_secs_f64();
        let cpu = match (args.server_pid, cpu_before) {
            (Some(pid), Some(before)) => format!(
                ", nats-server {:.1} µs CPU/message",
                (cpu_seconds(pid) - before) * 1e6 / args.messages as f64
            ),
            _ => String::new(),
        };
        let stored = js.get_stream(&run).await?.info().await?.state.messages;
        anyhow::ensure!(
            stored == args.messages as u64,
            "{mode:?}: {stored} stored of {}",
            args.messages
        );
        // The first batch again, as a relay republishing after a crash.
        let again = send(&js, &client, *mode, messages[..args.batch.min(messages.len())].to_vec()).await;
        let after = js.get_stream(&run).await?.info().await?.state.messages;
        println!(
            "  {:<7} {:>8.0} messages/s{cpu}; the first batch again: {} ({} stored)",
            format!("{mode:?}").to_lowercase(),
            args.messages as f64 / secs,
            match again {
                Ok(()) => "accepted".to_owned(),
                Err(e) => format!("refused: {e}"),
            },
            after
        );
        js.delete_stream(&run).await?;
    }
    Ok(())
}

/// Message `i`: one of four subjects, `size` bytes, its own `Nats-Msg-Id`.
fn message(prefix: &str, i: usize, size: usize) -> Outgoing {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", uuid::Uuid::new_v4().to_string().as_str());
    Outgoing {
        subject: format!("{prefix}.task.event{}.none", i % 4),
        headers,
        payload: vec![b'x'; size].into(),
    }
}

async fn send(
    js: &jetstream::Context,
    client: &async_nats::Client,
    mode: Mode,
    batch: Vec<Outgoing>,
) -> anyhow::Result<()> {
    match mode {
        Mode::Each => each(js, batch).await,
        Mode::Atomic => atomic(js, client, batch).await,
        Mode::Fast => fast(client, batch).await,
    }
}

/// Sets a stream's batch flag (`allow_atomic`, `allow_batched`) through the
/// stream API (the workspace's async-nats is built without the 2.12 and
/// 2.14 stream fields).
async fn allow(client: &async_nats::Client, name: &str, flag: &str) -> anyhow::Result<()> {
    let subject = format!("$JS.API.STREAM.INFO.{name}");
    let info: serde_json::Value = serde_json::from_slice(&client.request(subject, "".into()).await?.payload)?;
    let mut config = info["config"].clone();
    config[flag] = true.into();
    let answer = client
        .request(
            format!("$JS.API.STREAM.UPDATE.{name}"),
            serde_json::to_vec(&config)?.into(),
        )
        .await?;
    let answer: serde_json::Value = serde_json::from_slice(&answer.payload)?;
    anyhow::ensure!(answer["error"].is_null(), "{flag}: {}", answer["error"]);
    Ok(())
}

/// Every message on its own, many in flight at once, each acknowledged
/// (the relay's way).
async fn each(js: &jetstream::Context, batch: Vec<Outgoing>) -> anyhow::Result<()> {
    let mut pending = Vec::with_capacity(batch.len());
    for m in batch {
        pending.push(
            js.publish_with_headers(m.subject, m.headers, m.payload)
                .await?
                .into_future(),
        );
    }
    for ack in join_all(pending).await {
        ack?;
    }
    Ok(())
}

/// An atomic batch (ADR-50, nats-server 2.12): every message but the last
/// sent without waiting, the last with `Nats-Batch-Commit`; the server
/// answers the commit, storing all of the batch or none.
async fn atomic(js: &jetstream::Context, client: &async_nats::Client, batch: Vec<Outgoing>) -> anyhow::Result<()> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let last = batch.len();
    for (i, mut m) in batch.into_iter().enumerate() {
        m.headers.insert("Nats-Batch-Id", id.as_str());
        m.headers.insert("Nats-Batch-Sequence", (i + 1).to_string().as_str());
        if i + 1 < last {
            client.publish_with_headers(m.subject, m.headers, m.payload).await?;
            continue;
        }
        m.headers.insert("Nats-Batch-Commit", "1");
        js.publish_with_headers(m.subject, m.headers, m.payload).await?.await?;
    }
    Ok(())
}

/// A fast-ingest batch (ADR-50, nats-server 2.14): the batch's parameters
/// ride in each message's reply subject,
/// `<inbox>.<flow>.<gap>.<batch seq>.<operation>.$FI`; the server stores
/// each message as it comes, answers the first with the flow it allows
/// (an ack every N messages), then every N messages, and the last with a
/// publish acknowledgement. At most two acks' worth of messages are
/// unacknowledged at a time.
async fn fast(client: &async_nats::Client, batch: Vec<Outgoing>) -> anyhow::Result<()> {
    const FLOW: u64 = 100;
    const OUTSTANDING: u64 = 2;
    let inbox = format!("{}.{}", client.new_inbox(), uuid::Uuid::new_v4().simple());
    let mut replies = client.subscribe(format!("{inbox}.>")).await?;
    let n = batch.len() as u64;
    let (mut acked, mut every) = (0u64, 1u64);
    for (i, m) in batch.into_iter().enumerate() {
        let seq = i as u64 + 1;
        let operation = match seq {
            _ if seq == n => 2,
            1 => 0,
            _ => 1,
        };
        let reply = format!("{inbox}.{FLOW}.fail.{seq}.{operation}.$FI");
        client
            .publish_with_reply_and_headers(m.subject, reply, m.headers, m.payload)
            .await?;
        if operation == 2 {
            break;
        }
        // The first answer says the flow; then wait while too much is
        // unacknowledged.
        while seq == 1 || acked + every * OUTSTANDING <= seq {
            let ack = answer(&mut replies).await?;
            if let Some(s) = ack["seq"].as_u64().filter(|_| ack["last_seq"].is_null()) {
                acked = acked.max(s);
            }
            if let Some(m) = ack["msgs"].as_u64() {
                every = m.max(1);
            }
            if seq == 1 {
                break;
            }
        }
    }
    // The rest: flow acks (`"type": "ack"`), then the publish
    // acknowledgement (it names the stream).
    loop {
        let ack = answer(&mut replies).await?;
        if !ack["stream"].is_null() {
            anyhow::ensure!(ack["count"].as_u64() == Some(n), "the batch ended at {}", ack["count"]);
            return Ok(());
        }
    }
}

/// The server's next answer on a fast batch's inbox; an error it sends is
/// the batch's.
async fn answer(replies: &mut async_nats::Subscriber) -> anyhow::Result<serde_json::Value> {
    let reply = tokio::time::timeout(Duration::from_secs(5), replies.next())
        .await
        .map_err(|_| anyhow::anyhow!("no answer from the server within 5 s"))?
        .ok_or_else(|| anyhow::anyhow!("the replies ended"))?;
    let value: serde_json::Value = serde_json::from_slice(&reply.payload)?;
    anyhow::ensure!(value["error"].is_null(), "{}", value["error"]);
    Ok(value)
}
