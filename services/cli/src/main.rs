//! `omoi`: the command-line client of the mesh, and `omoi up`, which runs
//! the whole mesh on this machine and puts a sample ticket through it.

mod guardian;
mod live;
mod local;
mod ops;
mod people;
mod plan;
mod up;

#[global_allocator]
static ALLOCATOR: omoi_runtime::Allocator = omoi_runtime::ALLOCATOR;

use clap::{Parser, Subcommand};
use futures::StreamExt;
use omoi_proto::common::{TaskStatus, TicketPriority, TicketStatus};
use omoi_proto::ticket::{self as pb, ticket_service_client::TicketServiceClient};
use omoi_runtime::grpc::Connector;

#[derive(Debug, Parser)]
#[command(name = "omoi", version, about = "omoi: orchestrate coding agents")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// The ticket service.
    #[arg(
        long,
        global = true,
        env = "OMOI_TICKET_URL",
        default_value = "http://127.0.0.1:50051"
    )]
    ticket_url: String,
    /// The task queue (tasks, stats, logs, pause, resume).
    #[arg(
        long,
        global = true,
        env = "OMOI_TASK_QUEUE_URL",
        default_value = "http://127.0.0.1:50052"
    )]
    task_queue_url: String,
    /// The health service (agents).
    #[arg(
        long,
        global = true,
        env = "OMOI_HEALTH_URL",
        default_value = "http://127.0.0.1:50053"
    )]
    health_url: String,
    /// How read commands print: text, or the API's messages as JSON.
    #[arg(short, long, global = true, value_enum, default_value_t = ops::Output::Text)]
    output: ops::Output,
    /// Bearer token, when the services require one.
    #[arg(long, global = true, env = "OMOI_AUTH_TOKEN", hide_env_values = true)]
    auth_token: Option<String>,
    /// TLS for an https:// ticket URL (before the subcommand, or from the environment).
    #[command(flatten)]
    tls: omoi_runtime::tls::TlsArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole mesh locally (task-queue, health, ticket, two executors
    /// running the demo agent), file a sample ticket and follow it.
    Up(up::Up),
    /// File a ticket and print it with its tasks.
    Create {
        title: String,
        #[arg(long, default_value = "")]
        description: String,
        /// A git URL or an absolute path the agents work on; the work lands
        /// on a branch of its own there.
        #[arg(long, visible_alias = "repo", default_value = "")]
        repository: String,
        /// Where the ticket's branch starts (a branch, tag or commit);
        /// default: the repository's HEAD.
        #[arg(long, visible_alias = "base", default_value = "")]
        base_ref: String,
        /// Open a pull request from the branch when the ticket completes.
        #[arg(long)]
        pull_request: bool,
        /// Most the ticket's agents may spend, in USD; once spent, the
        /// ticket is PAUSED until the budget is raised.
        #[arg(long)]
        budget: Option<f64>,
        /// LOW, MEDIUM, HIGH or CRITICAL.
        #[arg(long, default_value = "MEDIUM")]
        priority: String,
        /// The ticket's tasks from a YAML file (a list of `title`, `phase`,
        /// and optionally `description`, `depends_on` by title or position,
        /// `priority`, `max_retries`, `timeout_seconds`, `concurrency_key`,
        /// `requires`: labels the agent must carry, e.g. `{runner: codex}`);
        /// default: the four phases one after the other.
        #[arg(long)]
        plan: Option<std::path::PathBuf>,
        /// A phase that waits for a person's approval before it starts
        /// (initial, implementation, integration, refactoring); repeat for
        /// more.
        #[arg(long = "approval", value_name = "PHASE")]
        approvals: Vec<String>,
        /// The project's check (e.g. "cargo test"), run in the workspace
        /// after each task's work is committed; its result is recorded on
        /// the task. Needs --repository.
        #[arg(long = "check", value_name = "COMMAND", default_value = "")]
        check_command: String,
        /// The ticket's own guardian thresholds, each `NAME=VALUE` (repeat,
        /// stall_seconds, spend_per_minute_usd, max_turns, budget_share,
        /// nudges, review_seconds).
        #[arg(long = "guardian", value_name = "NAME=VALUE")]
        guardian: Vec<String>,
    },
    /// Tickets waiting for a person: phases awaiting approval, with the
    /// work to approve, and paused tickets, with why.
    Inbox,
    /// Approve the phase of a ticket that awaits approval: its tasks start,
    /// told the comment.
    Approve {
        ticket_id: String,
        #[arg(long, default_value = "")]
        comment: String,
        /// The phase, when more than one awaits approval.
        #[arg(long)]
        phase: Option<String>,
    },
    /// Send the work a phase awaiting approval builds on back to its agent
    /// with what to change; the phase asks again once it is done.
    RequestChanges {
        ticket_id: String,
        comment: String,
        /// The phase, when more than one awaits approval.
        #[arg(long)]
        phase: Option<String>,
    },
    /// Print a ticket and its tasks.
    Get { ticket_id: String },
    /// Change a ticket's budget, priority, reaction cap or guardian
    /// thresholds (a PAUSED ticket whose budget is raised above what it
    /// spent, whose cap above the reactions it used, or that the guardian
    /// paused and is given thresholds, goes on).
    Update {
        ticket_id: String,
        /// The new budget in USD.
        #[arg(long, conflicts_with = "no_budget")]
        budget: Option<f64>,
        /// Lift the budget.
        #[arg(long)]
        no_budget: bool,
        /// LOW, MEDIUM, HIGH or CRITICAL.
        #[arg(long)]
        priority: Option<String>,
        /// Most follow-ups the forge may start on its pull request.
        #[arg(long)]
        max_reactions: Option<i32>,
        /// The ticket's guardian thresholds, all of them (those not given
        /// take the deployment's), each `NAME=VALUE`; sends on a ticket the
        /// guardian paused.
        #[arg(long = "guardian", value_name = "NAME=VALUE")]
        guardian: Vec<String>,
    },
    /// List tickets, newest first.
    #[command(visible_alias = "tickets")]
    List {
        #[arg(long, default_value_t = 20)]
        limit: i32,
    },
    /// Follow a ticket until it ends: on a terminal, its tasks as a live
    /// table (phase, status, attempt, agent, elapsed time, cost); piped, or
    /// with --events, its events as lines.
    Watch {
        ticket_id: String,
        /// Print the events as lines even on a terminal.
        #[arg(long)]
        events: bool,
    },
    /// Cancel a ticket and its open tasks, or one task (and the tasks that
    /// wait for it).
    Cancel {
        /// A ticket id, or a task id.
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Send a ticket's failed and cancelled tasks (or one task) round
    /// again, each with a fresh retry budget.
    Retry {
        /// A ticket id, or a task id.
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
        /// A task's next attempt starts a new agent session instead of
        /// resuming the last one.
        #[arg(long)]
        fresh: bool,
    },
    /// Ask the agent that worked a ticket for more: a new task resuming its
    /// session with the message, one more commit on the ticket's branch.
    FollowUp {
        ticket_id: String,
        message: String,
        /// The task whose session to resume (default: the ticket's last
        /// completed task).
        #[arg(long, default_value = "")]
        task: String,
    },
    /// Land another candidate of a best-of-N step in place of the one
    /// chosen: the step's choosing task and the candidate's number.
    Choose {
        task_id: String,
        candidate: i32,
        /// Why, recorded with the choice.
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// List tasks, oldest first.
    Tasks {
        #[arg(long)]
        ticket: Option<String>,
        /// pending, assigned, running, completed, failed, timed_out, cancelled.
        #[arg(long)]
        status: Option<String>,
        /// initial, implementation, integration, refactoring.
        #[arg(long)]
        phase: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Print one task.
    Task { task_id: String },
    /// Print one agent.
    Agent { agent_id: String },
    /// List the agents the health service knows.
    Agents {
        /// healthy, stale or deregistered.
        #[arg(long)]
        status: Option<String>,
    },
    /// The queue: counts by status, ready work, pauses.
    Stats,
    /// What the agent of a task did (its events), readable; `-f` follows
    /// it live until the task ends.
    Logs {
        task_id: String,
        #[arg(short, long)]
        follow: bool,
    },
    /// Run the guardian over recorded event streams (tasks' output, or files
    /// of `omoi logs --output json`): which interventions would fire, and
    /// the tokens stopping would have saved.
    GuardianReplay {
        /// Tasks whose every attempt to replay.
        task_ids: Vec<String>,
        /// Files of exported events (JSON lines).
        #[arg(long = "file")]
        files: Vec<std::path::PathBuf>,
        #[command(flatten)]
        settings: guardian::Settings,
    },
    /// Hold back dispatch: everything, a phase, a ticket, or a phase of a
    /// ticket (pending work waits, running work finishes).
    Pause {
        #[arg(long)]
        phase: Option<String>,
        #[arg(long)]
        ticket: Option<String>,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Lift a pause (no scope: every pause).
    Resume {
        #[arg(long)]
        phase: Option<String>,
        #[arg(long)]
        ticket: Option<String>,
    },
    /// Cap how many tasks with a concurrency key are out at once, on every
    /// replica (a ticket's tasks carry its repository as their key), or
    /// lift the cap.
    Limit {
        key: String,
        /// Most of the key's tasks assigned or running at once (0 holds
        /// them all back).
        #[arg(required_unless_present = "clear")]
        max_running: Option<i32>,
        /// Lift the key's cap.
        #[arg(long, conflicts_with = "max_running")]
        clear: bool,
    },
    /// Subscribe a receiver (your webhook, a Slack incoming webhook) to
    /// ticket events: each POSTed once, signed with the secret, retried
    /// until it is taken.
    Subscribe {
        url: String,
        /// Event types, comma-separated (TICKET_COMPLETED,TICKET_FAILED,...).
        #[arg(long, value_delimiter = ',', required = true)]
        events: Vec<String>,
        /// json or slack.
        #[arg(long, default_value = "json")]
        format: String,
        /// The signing secret (16 to 256 bytes), from the environment or a
        /// file: never on the command line.
        #[arg(
            long,
            env = "OMOI_NOTIFY_SECRET",
            hide_env_values = true,
            conflicts_with = "secret_file"
        )]
        secret: Option<String>,
        #[arg(long)]
        secret_file: Option<std::path::PathBuf>,
    },
    /// List the subscriptions.
    Subscriptions,
    /// A subscription's deliveries, newest first, each with its tries.
    Deliveries {
        subscription_id: String,
        #[arg(long, default_value_t = 20)]
        limit: i32,
    },
    /// Remove a subscription.
    Unsubscribe { subscription_id: String },
    /// Print shell completions (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Print the `nsc` command that makes the executors' NATS user for a
    /// NATS in operator (JWT) mode: publish agents' output and keep session
    /// checkpoints, never an event or a stream deletion (the permissions
    /// `omoi up`'s private NATS gives it).
    NatsPermissions {
        /// The user's name.
        #[arg(long, default_value = "omoi-executor")]
        name: String,
        #[arg(long, env = "OMOI_SUBJECT_PREFIX", default_value = "omoi")]
        subject_prefix: String,
        #[arg(long, env = "OMOI_EVENTS_STREAM", default_value = "OMOI_EVENTS")]
        events_stream: String,
        /// The Object Store bucket of session checkpoints.
        #[arg(long, env = "OMOI_SESSIONS_BUCKET", default_value = "OMOI_SESSIONS")]
        sessions_bucket: String,
    },
}

pub type Tickets = TicketServiceClient<omoi_runtime::grpc::Client>;

pub fn tickets(url: &str, connector: &Connector) -> anyhow::Result<Tickets> {
    Ok(TicketServiceClient::new(connector.client(url, "OMOI_TICKET_URL")?))
}

fn priority(name: &str) -> anyhow::Result<i32> {
    let upper = name.to_ascii_uppercase();
    let full = format!("TICKET_PRIORITY_{}", upper.trim_start_matches("TICKET_PRIORITY_"));
    match TicketPriority::from_str_name(&full) {
        Some(p) if p != TicketPriority::Unspecified => Ok(p.into()),
        _ => anyhow::bail!("priority {name:?}: use LOW, MEDIUM, HIGH or CRITICAL"),
    }
}

/// An enum value's name without its prefix (`IN_PROGRESS`); UNSPECIFIED
/// for numbers this version does not know.
pub fn short_name(full: &'static str, prefix: &str) -> &'static str {
    full.strip_prefix(prefix).unwrap_or(full)
}

pub fn status_name(status: i32) -> &'static str {
    let s = TicketStatus::try_from(status).unwrap_or(TicketStatus::Unspecified);
    short_name(s.as_str_name(), "TICKET_STATUS_")
}

pub fn task_status_name(status: i32) -> &'static str {
    let s = TaskStatus::try_from(status).unwrap_or(TaskStatus::Unspecified);
    short_name(s.as_str_name(), "TASK_STATUS_")
}

fn print_ticket(t: &pb::Ticket, tasks: &[omoi_proto::taskqueue::Task]) {
    println!("ticket {}  {}  {:?}", t.id, status_name(t.status), t.title);
    if !t.paused_reason.is_empty() {
        println!("  paused: {}", t.paused_reason);
    }
    if let Some(source) = &t.source {
        println!("  from {} ({})", source.url, source.kind);
    }
    for line in people::gate_lines(t) {
        println!("  {line}");
    }
    if let Some(max) = t.max_cost_usd {
        let spent = t.usage.as_ref().map_or(0.0, |u| u.cost_usd);
        println!("  budget ${max:.2}, spent ${spent:.4}");
    }
    if !t.branch.is_empty() {
        println!("  branch {}  in {}{}", t.branch, t.repository, head_note(t));
    }
    if !t.check_command.is_empty() {
        println!("  check: {}", t.check_command.replace('\n', "; "));
    }
    if !t.pull_request_url.is_empty() {
        println!(
            "  pull request {}  reactions {} of {}",
            t.pull_request_url, t.reactions, t.max_reactions
        );
    }
    for task in tasks {
        let commit = task
            .git
            .as_ref()
            .filter(|g| g.commit != g.base_commit)
            .map(|g| format!("  commit {}", short_commit(&g.commit)))
            .unwrap_or_default();
        println!(
            "  task {}  {:<11} attempt {}  {}{commit}",
            task.id,
            task_status_name(task.status),
            task.attempt,
            task.title
        );
    }
}

fn head_note(t: &pb::Ticket) -> String {
    if t.head_commit.is_empty() {
        String::new()
    } else {
        format!(" at {}", short_commit(&t.head_commit))
    }
}

/// A commit id as people quote it.
pub fn short_commit(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// What a task left on its ticket's branch, on one line.
fn git_line(g: &omoi_proto::common::GitChange) -> String {
    if g.commit == g.base_commit {
        format!("no change; {} stays at {}", g.branch, short_commit(&g.commit))
    } else {
        format!(
            "commit {} on {}: {} files, +{} -{}",
            short_commit(&g.commit),
            g.branch,
            g.files_changed,
            g.insertions,
            g.deletions
        )
    }
}

/// The ticket's outcome: each task with its result and workspace.
pub fn print_ticket_summary(r: &pb::GetTicketResponse, workspaces: &std::path::Path) {
    let t = r.ticket.clone().unwrap_or_default();
    println!("Ticket {} is {}.", t.id, status_name(t.status));
    for task in &r.tasks {
        let result = task
            .result
            .as_ref()
            .map(omoi_proto::convert::struct_to_json)
            .unwrap_or_default();
        let changed: Vec<&str> = result["changed_files"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        println!(
            "  {:<11} {}  attempt {}  changed {:?}",
            task_status_name(task.status),
            task.title,
            task.attempt,
            changed
        );
        if let Some(ws) = result["workspace"].as_str() {
            println!("              workspace {ws}");
        } else if !task.error_message.is_empty() {
            println!("              error: {}", task.error_message);
        }
        if let Some(g) = &task.git {
            println!("              {}", git_line(g));
        }
        if let Some(u) = &task.usage {
            println!("              {}", usage_line(u));
        }
    }
    if let Some(u) = &t.usage {
        println!("Spent: {}", usage_line(u));
    }
    if !t.branch.is_empty() {
        println!(
            "The work is on branch {} of {}{}.",
            t.branch,
            t.repository,
            head_note(&t)
        );
    }
    println!("Workspaces are under {}.", workspaces.display());
}

/// Tokens, cost and model of a usage, on one line.
pub fn usage_line(u: &omoi_proto::common::Usage) -> String {
    format!(
        "{} in / {} out / {} cached tokens, ${:.4}{}, {}",
        u.input_tokens,
        u.output_tokens,
        u.cache_read_tokens + u.cache_write_tokens,
        u.cost_usd,
        if u.cost_estimated { " (estimated)" } else { "" },
        if u.model.is_empty() { "model unknown" } else { &u.model }
    )
}

/// Prints events of a ticket as they come, until its stream ends (as
/// JSON, one event per line, with `-o json`).
pub async fn watch(client: &mut Tickets, ticket_id: &str, out: ops::Output) -> anyhow::Result<()> {
    let mut events = client
        .watch_ticket(pb::WatchTicketRequest {
            ticket_id: ticket_id.to_owned(),
        })
        .await?
        .into_inner();
    while let Some(event) = events.next().await {
        let e = event?;
        if out == ops::Output::Json {
            println!("{}", ops::json_line(&e, "omoi.events.v1.Event")?);
            continue;
        }
        let at = e
            .occurred_at
            .as_ref()
            .and_then(omoi_proto::convert::from_timestamp)
            .map(|t| t.format("%H:%M:%S%.3f").to_string())
            .unwrap_or_default();
        let payload = e
            .payload
            .as_ref()
            .map(omoi_proto::convert::struct_to_json)
            .unwrap_or_default();
        let detail = ["title", "phase", "agent_id", "error", "reason", "status"]
            .iter()
            .filter_map(|k| payload.get(*k).and_then(|v| v.as_str()).map(|v| format!("{k}={v}")))
            .collect::<Vec<_>>()
            .join(" ");
        println!(
            "{at}  {:<18} {:<6} {}  {detail}",
            e.event_type,
            e.entity_type,
            short(&e.entity_id)
        );
    }
    Ok(())
}

/// The random tail of a (time-ordered) UUID: enough to tell ids apart.
pub fn short(id: &str) -> &str {
    id.get(id.len().saturating_sub(12)..).unwrap_or(id)
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = run(cli).await;
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("omoi: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Whether `url` names this machine's loopback.
fn on_loopback(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or_default();
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.split(':').next().unwrap_or_default(),
    };
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    // Given no token, the CLI presents the local mesh's to services on this
    // machine (never to another).
    let loopback = [&cli.ticket_url, &cli.task_queue_url, &cli.health_url]
        .iter()
        .all(|u| on_loopback(u));
    let token = cli
        .auth_token
        .clone()
        .or_else(|| loopback.then(local::local_token).flatten());
    let connector = &Connector::new(token.as_deref(), &cli.tls)?;
    match cli.command {
        Command::Up(up) => up.run().await,
        Command::Create {
            title,
            description,
            repository,
            base_ref,
            pull_request,
            budget,
            priority: p,
            plan: plan_file,
            approvals,
            check_command,
            guardian,
        } => {
            let guardian = (!guardian.is_empty()).then(|| guardian::given(&guardian)).transpose()?;
            let plan = plan_file.as_deref().map(plan::read).transpose()?.unwrap_or_default();
            let approvals = approvals
                .iter()
                .map(|a| ops::phase(a))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let r = tickets(&cli.ticket_url, connector)?
                .create_ticket(pb::CreateTicketRequest {
                    title,
                    description,
                    repository,
                    base_ref,
                    pull_request,
                    max_cost_usd: budget,
                    priority: priority(&p)?,
                    plan,
                    approvals,
                    check_command,
                    guardian,
                    ..Default::default()
                })
                .await?
                .into_inner();
            print_ticket(&r.ticket.unwrap_or_default(), &r.tasks);
            Ok(())
        }
        Command::Update {
            ticket_id,
            budget,
            no_budget,
            priority: p,
            max_reactions,
            guardian: thresholds,
        } => {
            let mut paths = Vec::new();
            let guardian = (!thresholds.is_empty())
                .then(|| guardian::given(&thresholds))
                .transpose()?;
            if guardian.is_some() {
                paths.push("guardian".to_owned());
            }
            if budget.is_some() || no_budget {
                paths.push("max_cost_usd".to_owned());
            }
            if max_reactions.is_some() {
                paths.push("max_reactions".to_owned());
            }
            let priority = p.as_deref().map(priority).transpose()?;
            if priority.is_some() {
                paths.push("priority".to_owned());
            }
            anyhow::ensure!(
                !paths.is_empty(),
                "say what to change: --budget, --no-budget, --priority, --max-reactions or --guardian"
            );
            let r = tickets(&cli.ticket_url, connector)?
                .update_ticket(pb::UpdateTicketRequest {
                    ticket: Some(pb::Ticket {
                        id: ticket_id,
                        max_cost_usd: budget,
                        priority: priority.unwrap_or_default(),
                        max_reactions: max_reactions.unwrap_or_default(),
                        guardian,
                        ..Default::default()
                    }),
                    update_mask: Some(prost_types::FieldMask { paths }),
                })
                .await?
                .into_inner();
            print_ticket(&r.ticket.unwrap_or_default(), &[]);
            Ok(())
        }
        Command::Get { ticket_id } => {
            let r = tickets(&cli.ticket_url, connector)?
                .get_ticket(pb::GetTicketRequest {
                    ticket_id,
                    ..Default::default()
                })
                .await?
                .into_inner();
            if cli.output == ops::Output::Json {
                println!("{}", ops::json(&r, "omoi.ticket.v1.GetTicketResponse")?);
                return Ok(());
            }
            print_ticket(&r.ticket.unwrap_or_default(), &r.tasks);
            Ok(())
        }
        Command::List { limit } => {
            let r = tickets(&cli.ticket_url, connector)?
                .list_tickets(pb::ListTicketsRequest {
                    page_size: limit,
                    ..Default::default()
                })
                .await?
                .into_inner();
            if cli.output == ops::Output::Json {
                println!("{}", ops::json(&r, "omoi.ticket.v1.ListTicketsResponse")?);
                return Ok(());
            }
            for t in r.tickets {
                println!("{}  {:<11} {:?}", t.id, status_name(t.status), t.title);
            }
            Ok(())
        }
        Command::Watch { ticket_id, events } => {
            use std::io::IsTerminal;
            let mut client = tickets(&cli.ticket_url, connector)?;
            if events || cli.output == ops::Output::Json || !std::io::stdout().is_terminal() {
                watch(&mut client, &ticket_id, cli.output).await
            } else {
                live::watch(&mut client, &ticket_id).await
            }
        }
        Command::Cancel { id, reason } => {
            let asked = tickets(&cli.ticket_url, connector)?
                .cancel_ticket(pb::CancelTicketRequest {
                    ticket_id: id.clone(),
                    reason: reason.clone(),
                })
                .await;
            match asked {
                Ok(r) => {
                    let t = r.into_inner().ticket.unwrap_or_default();
                    println!("ticket {}  {}", t.id, status_name(t.status));
                    Ok(())
                }
                // Not a ticket: a task, then.
                Err(s) if s.code() == tonic::Code::NotFound => {
                    let mut q = ops::queue(&cli.task_queue_url, connector)?;
                    q.cancel_task(omoi_proto::taskqueue::CancelTaskRequest {
                        task_id: id.clone(),
                        reason,
                    })
                    .await?;
                    ops::task(&mut q, id, ops::Output::Text).await
                }
                Err(s) => Err(s.into()),
            }
        }
        Command::Inbox => people::inbox(&mut tickets(&cli.ticket_url, connector)?, cli.output).await,
        Command::Approve {
            ticket_id,
            comment,
            phase,
        } => {
            let phase = phase.as_deref().map(ops::phase).transpose()?.unwrap_or_default();
            people::approve(&mut tickets(&cli.ticket_url, connector)?, ticket_id, comment, phase).await
        }
        Command::RequestChanges {
            ticket_id,
            comment,
            phase,
        } => {
            let phase = phase.as_deref().map(ops::phase).transpose()?.unwrap_or_default();
            people::request_changes(&mut tickets(&cli.ticket_url, connector)?, ticket_id, comment, phase).await
        }
        Command::FollowUp {
            ticket_id,
            message,
            task,
        } => {
            let r = tickets(&cli.ticket_url, connector)?
                .follow_up(pb::FollowUpRequest {
                    ticket_id,
                    message,
                    task_id: task,
                })
                .await?
                .into_inner();
            let task = r.task.unwrap_or_default();
            print_ticket(&r.ticket.unwrap_or_default(), std::slice::from_ref(&task));
            Ok(())
        }
        Command::Choose {
            task_id,
            candidate,
            comment,
        } => {
            let r = tickets(&cli.ticket_url, connector)?
                .choose_candidate(pb::ChooseCandidateRequest {
                    task_id,
                    candidate,
                    comment,
                })
                .await?
                .into_inner();
            let task = r.task.unwrap_or_default();
            print_ticket(&r.ticket.unwrap_or_default(), std::slice::from_ref(&task));
            Ok(())
        }
        Command::Retry { id, reason, fresh } => {
            let asked = tickets(&cli.ticket_url, connector)?
                .retry_ticket(pb::RetryTicketRequest {
                    ticket_id: id.clone(),
                    reason: reason.clone(),
                })
                .await;
            match asked {
                Ok(r) => {
                    let r = r.into_inner();
                    print_ticket(&r.ticket.unwrap_or_default(), &r.tasks);
                    Ok(())
                }
                // Not a ticket: a task, then.
                Err(s) if s.code() == tonic::Code::NotFound => {
                    let mut q = ops::queue(&cli.task_queue_url, connector)?;
                    q.retry_task(omoi_proto::taskqueue::RetryTaskRequest {
                        task_id: id.clone(),
                        reason,
                        fresh,
                    })
                    .await?;
                    ops::task(&mut q, id, ops::Output::Text).await
                }
                Err(s) => Err(s.into()),
            }
        }
        Command::Tasks {
            ticket,
            status,
            phase,
            limit,
        } => {
            let filter = omoi_proto::taskqueue::ListTasksRequest {
                ticket_id: ticket.unwrap_or_default(),
                status: status.as_deref().map(ops::task_status).transpose()?.unwrap_or_default(),
                phase: phase.as_deref().map(ops::phase).transpose()?.unwrap_or_default(),
                page_size: 1000,
                ..Default::default()
            };
            ops::tasks(
                &mut ops::queue(&cli.task_queue_url, connector)?,
                filter,
                limit,
                cli.output,
            )
            .await
        }
        Command::Task { task_id } => {
            ops::task(&mut ops::queue(&cli.task_queue_url, connector)?, task_id, cli.output).await
        }
        Command::Agents { status } => {
            let status = status
                .as_deref()
                .map(ops::agent_status)
                .transpose()?
                .unwrap_or_default();
            ops::agents(&mut ops::health(&cli.health_url, connector)?, status, cli.output).await
        }
        Command::Agent { agent_id } => {
            ops::agent(&mut ops::health(&cli.health_url, connector)?, agent_id, cli.output).await
        }
        Command::Stats => ops::stats(&mut ops::queue(&cli.task_queue_url, connector)?, cli.output).await,
        Command::GuardianReplay {
            task_ids,
            files,
            settings,
        } => {
            guardian::replay(
                &mut ops::queue(&cli.task_queue_url, connector)?,
                task_ids,
                files,
                &settings,
            )
            .await
        }
        Command::Logs { task_id, follow } => {
            ops::logs(
                &mut ops::queue(&cli.task_queue_url, connector)?,
                task_id,
                follow,
                cli.output,
            )
            .await
        }
        Command::Pause { phase, ticket, reason } => {
            let phase = phase.as_deref().map(ops::phase).transpose()?.unwrap_or_default();
            let mut q = ops::queue(&cli.task_queue_url, connector)?;
            ops::pause(&mut q, phase, ticket.unwrap_or_default(), reason).await
        }
        Command::Resume { phase, ticket } => {
            let phase = phase.as_deref().map(ops::phase).transpose()?.unwrap_or_default();
            let mut q = ops::queue(&cli.task_queue_url, connector)?;
            ops::resume(&mut q, phase, ticket.unwrap_or_default()).await
        }
        Command::Limit {
            key,
            max_running,
            clear,
        } => {
            let mut q = ops::queue(&cli.task_queue_url, connector)?;
            ops::limit(&mut q, key, max_running.unwrap_or_default(), clear).await
        }
        Command::Subscribe {
            url,
            events,
            format,
            secret,
            secret_file,
        } => {
            let secret = match (secret, secret_file) {
                (Some(s), _) => s,
                (None, Some(file)) => std::fs::read_to_string(&file)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?
                    .trim_end()
                    .to_owned(),
                (None, None) => anyhow::bail!("give the signing secret: OMOI_NOTIFY_SECRET or --secret-file"),
            };
            let mut n = people::notifications(&cli.ticket_url, connector)?;
            people::subscribe(&mut n, url, events, &format, secret, cli.output).await
        }
        Command::Subscriptions => {
            people::subscriptions(&mut people::notifications(&cli.ticket_url, connector)?, cli.output).await
        }
        Command::Deliveries { subscription_id, limit } => {
            let mut n = people::notifications(&cli.ticket_url, connector)?;
            people::deliveries(&mut n, subscription_id, limit, cli.output).await
        }
        Command::Unsubscribe { subscription_id } => {
            people::unsubscribe(&mut people::notifications(&cli.ticket_url, connector)?, subscription_id).await
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "omoi", &mut std::io::stdout());
            Ok(())
        }
        Command::NatsPermissions {
            name,
            subject_prefix,
            events_stream,
            sessions_bucket,
        } => {
            let topology = omoi_bus::Topology {
                prefix: subject_prefix,
                stream: events_stream,
                ..Default::default()
            };
            println!("{}", nsc_add_user(&name, &topology, &sessions_bucket));
            Ok(())
        }
    }
}

/// `nsc add user` with the executors' permissions, quoted for a shell.
fn nsc_add_user(name: &str, topology: &omoi_bus::Topology, bucket: &str) -> String {
    let p = omoi_bus::auth::executor_permissions(topology, bucket);
    let list = |subjects: &[String]| format!("'{}'", subjects.join(","));
    format!(
        "nsc add user --name '{name}' \\\n  --allow-pub {} \\\n  --deny-pub {} \\\n  --allow-sub {}",
        list(&p.publish_allow),
        list(&p.publish_deny),
        list(&p.subscribe_allow)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_executors_nsc_user_carries_its_permissions() {
        let topology = omoi_bus::Topology::default();
        let command = nsc_add_user("omoi-executor", &topology, "OMOI_SESSIONS");
        assert!(
            command.starts_with("nsc add user --name 'omoi-executor' \\\n"),
            "{command}"
        );
        assert!(
            command.contains("--allow-pub 'omoi.output.>,$O.OMOI_SESSIONS.>,"),
            "{command}"
        );
        assert!(
            command.contains("--deny-pub 'omoi.events.>,omoi.control.>,$JS.API.STREAM.DELETE.>"),
            "{command}"
        );
        assert!(command.ends_with("--allow-sub '_INBOX.>'"), "{command}");
    }

    #[test]
    fn only_this_machines_services_get_the_local_token() {
        for url in [
            "http://127.0.0.1:50051",
            "https://localhost:1",
            "http://[::1]:5",
            "127.0.0.2:9",
        ] {
            assert!(on_loopback(url), "{url}");
        }
        for url in [
            "http://omoi.example:50051",
            "https://10.0.0.1",
            "http://127.0.0.1.evil.example",
        ] {
            assert!(!on_loopback(url), "{url}");
        }
    }
}
