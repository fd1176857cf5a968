//! omoi-console in the test's process, in front of services at given URLs.

use tokio_util::sync::CancellationToken;

pub struct Console {
    pub url: String,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Console {
    /// Serves on a free loopback port; `token` is the mesh's bearer token.
    pub async fn start(ticket: &str, task_queue: &str, health: &str, token: Option<&str>) -> Self {
        Self::start_with_webhooks(ticket, task_queue, health, token, None).await
    }

    /// One that takes GitHub's webhook deliveries signed with `secret`.
    pub async fn start_with_webhooks(
        ticket: &str,
        task_queue: &str,
        health: &str,
        token: Option<&str>,
        secret: Option<&str>,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let config = omoi_console::Config {
            listen_addr: listener.local_addr().unwrap(),
            ticket_url: ticket.to_owned(),
            task_queue_url: task_queue.to_owned(),
            health_url: health.to_owned(),
            auth_token: token.map(str::to_owned),
            auth_token_file: None,
            max_body_bytes: 1 << 20,
            github_webhook_secret: secret.map(str::to_owned),
            github_webhook_secret_file: None,
            tls: Default::default(),
            log_format: omoi_runtime::config::LogFormat::Text,
        };
        let stop = CancellationToken::new();
        let task = tokio::spawn(omoi_console::serve(config, listener, stop.clone()));
        Self { url, stop, task }
    }

    /// Stops it and checks that it served without an error.
    pub async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}
