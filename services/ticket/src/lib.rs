//! omoi's ticket service: validates tickets, splits them into phase tasks on
//! the task queue, follows their tasks' events to keep each ticket's status,
//! streams a ticket's events to watchers and the tickets' changes to
//! boards, opens a completed ticket's pull request, and delivers
//! notifications to the receivers people subscribe.

mod board;
pub mod config;
mod forge_news;
pub mod notify;
mod poll;
mod pulls;
mod queue;
mod reactions;
mod requests;
mod service;
mod task_events;
mod tasks;
mod watch;

use std::sync::Arc;
use std::time::Duration;

use omoi_base::Base;
use omoi_proto::notify::notification_service_server::NotificationServiceServer;
use omoi_proto::ticket::ticket_service_server::TicketServiceServer;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;

pub use config::Config;
pub use service::Tickets;

pub const SERVICE_NAME: &str = "omoi.ticket.v1.TicketService";

/// Runs the service on `incoming` until `shutdown`; open WatchTicket
/// streams end first.
pub async fn serve(config: Config, incoming: TcpIncoming, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut base = Base::connect(&config.common, "omoi-ticket", config.db_max_connections).await?;
    base.spawn_vacuum(&["tickets", "ticket_tasks", "deliveries"]);
    base.spawn_retention(
        "ended tickets",
        "OMOI_TICKET_RETENTION_SECONDS",
        config.ticket_retention_seconds,
        |store, keep, batch| async move { store.prune_tickets(keep, batch).await },
    )?;
    // A notification's record is kept as long as a ticket's.
    base.spawn_retention(
        "ended deliveries",
        "OMOI_TICKET_RETENTION_SECONDS",
        config.ticket_retention_seconds,
        |store, keep, batch| async move { store.prune_deliveries(keep, batch).await },
    )?;
    let github = Arc::new(pulls::GitHub::new(&config.github_api_url, config.github_token())?);
    let queue = queue::Queue::connect(&config.task_queue_url, &config.common.host.connector()?)?;
    let tasks = Arc::new(tasks::TicketTasks::new(base.store.clone(), queue));
    {
        let t = Arc::clone(&tasks);
        let every = Duration::from_secs_f64(config.enqueue_retry_seconds.max(0.05));
        base.spawn_after_migration(move |stop| t.enqueue_waiting(every, stop));
        let t = Arc::clone(&tasks);
        let (nats, topology) = (base.nats.clone(), base.topology.clone());
        base.spawn_after_migration(move |stop| task_events::follow(t, nats, topology, stop));
        // Pull requests opened, and review comments answered once their fix
        // landed: both looked for as often.
        let every = Duration::from_secs_f64(config.pull_request_interval_seconds.max(0.05));
        let (store, gh) = (base.store.clone(), Arc::clone(&github));
        base.spawn_after_migration(move |stop| pulls::run(store, gh, every, stop));
        let (store, gh, t) = (base.store.clone(), Arc::clone(&github), Arc::clone(&tasks));
        base.spawn_after_migration(move |stop| reactions::answer_reviews(store, gh, t, every, stop));
        // The forge hears what becomes of its issues and branches.
        let (store, gh, console) = (
            base.store.clone(),
            Arc::clone(&github),
            config.console_url.trim_end_matches('/').to_owned(),
        );
        let (nats, topology) = (base.nats.clone(), base.topology.clone());
        base.spawn_after_migration(move |stop| forge_news::follow(store, gh, console, nats, topology, stop));
    }
    let hub = board::Hub::new();
    {
        let (h, store) = (Arc::clone(&hub), base.store.clone());
        base.spawn_after_migration(move |stop| h.follow_database(store, stop));
        let (h, nats, topology) = (Arc::clone(&hub), base.nats.clone(), base.topology.clone());
        base.spawn_after_migration(move |stop| h.follow_events(nats, topology, stop));
    }
    let watchers = CancellationToken::new();
    let router = base.router(&[SERVICE_NAME], &shutdown).await?;
    let tickets = Arc::new(Tickets::new(
        base.store.clone(),
        tasks,
        base.nats.clone(),
        base.topology.clone(),
        watchers.clone(),
        config.phase_instructions.clone(),
        hub,
        reactions::Forge {
            github: Arc::clone(&github),
            mention: config.github_mention.clone(),
            max_reactions: config.max_reactions,
            repositories: config
                .github_repositories
                .split(',')
                .map(str::trim)
                .filter(|r| !r.is_empty())
                .map(str::to_lowercase)
                .collect(),
            issue_label: config.github_issue_label.clone(),
        },
    ));
    {
        let (t, gh) = (Arc::clone(&tickets), Arc::clone(&github));
        let every = Duration::from_secs_f64(config.pull_request_interval_seconds.max(0.05));
        base.spawn_after_migration(move |stop| poll::merge_checks(t, gh, every, stop));
    }
    if config.github_poll_seconds > 0.0 {
        let (t, gh) = (Arc::clone(&tickets), Arc::clone(&github));
        let every = Duration::from_secs_f64(config.github_poll_seconds.max(0.05));
        base.spawn_after_migration(move |stop| poll::run(t, gh, every, stop));
    }
    let targets = config.notify_targets();
    {
        let sender = Arc::new(notify::deliver::Sender {
            store: base.store.clone(),
            targets: targets.clone(),
            backoff: omoi_domain::notify::Backoff {
                base: Duration::from_secs_f64(config.notify_backoff_seconds.max(0.01)),
                max: Duration::from_secs_f64(config.notify_max_backoff_seconds.max(0.01)),
            },
            timeout: Duration::from_secs_f64(config.notify_timeout_seconds.max(0.1)),
            console_url: config.console_url.trim_end_matches('/').to_owned(),
            wake: Arc::new(tokio::sync::Notify::new()),
            tls: notify::deliver::receivers_tls()?,
        });
        let (s, nats, topology) = (Arc::clone(&sender), base.nats.clone(), base.topology.clone());
        base.spawn_after_migration(move |stop| notify::deliver::follow(s, nats, topology, stop));
        base.spawn_after_migration(move |stop| notify::deliver::send(sender, stop));
    }
    let api = TicketServiceServer::from_arc(tickets)
        .max_decoding_message_size(config.common.host.max_message_bytes)
        .max_encoding_message_size(config.common.host.max_message_bytes);
    let notifications = NotificationServiceServer::new(notify::Notifications::new(base.store.clone(), targets))
        .max_decoding_message_size(config.common.host.max_message_bytes)
        .max_encoding_message_size(config.common.host.max_message_bytes);
    let router = router
        .add_service(InterceptedService::new(api, base.admission()))
        .add_service(InterceptedService::new(notifications, base.admission()));
    base.run(router, incoming, shutdown, async move { watchers.cancel() })
        .await
}
