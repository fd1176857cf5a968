//! TLS and mTLS between every service and for clients, with certificates
//! made here: a ticket goes through a mesh whose every connection is mTLS,
//! and callers without the right certificate get nothing done.

use std::path::Path;
use std::time::Duration;

use omoi_proto::ticket::{self as pb, ticket_service_client::TicketServiceClient};
use omoi_runtime::grpc::Connector;
use omoi_runtime::tls::TlsArgs;
use omoi_tests::Infra;
use omoi_tests::mesh::{Options, ProcessMesh};
use omoi_tests::pki::Pki;
use omoi_tests::process::free_port;
use tonic_health::ServingStatus;

fn trusting(mut args: TlsArgs, ca: &Path) -> TlsArgs {
    args.tls_ca = Some(ca.to_owned());
    args
}

async fn create(
    tickets: &mut TicketServiceClient<tonic::transport::Channel>,
    title: &str,
) -> Result<String, tonic::Status> {
    let r = tickets
        .create_ticket(pb::CreateTicketRequest {
            title: title.into(),
            ..Default::default()
        })
        .await?;
    Ok(r.into_inner().ticket.unwrap().id)
}

fn tickets(connector: &Connector, url: &str) -> TicketServiceClient<tonic::transport::Channel> {
    TicketServiceClient::new(connector.channel(url).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_goes_through_a_mesh_that_speaks_only_mtls_and_strangers_get_nothing_done() {
    let pki = Pki::new();
    let ca = pki.ca("ca");
    let ca_pem = pki.path("ca.pem");
    pki.leaf("service", &ca);
    let client = trusting(pki.leaf("client", &ca), &ca_pem);
    let rogue_ca = pki.ca("rogue-ca");
    let rogue = trusting(pki.leaf("rogue", &rogue_ca), &ca_pem);

    let infra = Infra::new().await.unwrap();
    let env = vec![
        (
            "OMOI_TLS_CERT".to_string(),
            pki.path("service.pem").display().to_string(),
        ),
        (
            "OMOI_TLS_KEY".to_string(),
            pki.path("service.key").display().to_string(),
        ),
        ("OMOI_TLS_CA".to_string(), ca_pem.display().to_string()),
        ("OMOI_TLS_CLIENT_CA".to_string(), ca_pem.display().to_string()),
    ];
    let options = Options {
        executors: 1,
        env,
        tls: Some(Connector::new(None, &client).unwrap()),
        ..Options::default()
    };
    let mesh = ProcessMesh::start(&infra, options).await.unwrap();
    let url = mesh.ticket.url.clone();
    assert!(url.starts_with("https://"), "{url}");

    // The executor reached task-queue, health and ticket over mTLS to get
    // this far; now the whole chain runs a ticket.
    let good = Connector::new(None, &client).unwrap();
    let id = create(&mut tickets(&good, &url), "over mTLS").await.unwrap();
    omoi_tests::wait_ticket(&mesh.tickets(), &id, omoi_proto::common::TicketStatus::Completed as i32).await;

    // A person's decision is recorded under their certificate's name.
    let ada = Connector::new(None, &trusting(pki.leaf("ada", &ca), &ca_pem)).unwrap();
    let gated = tickets(&good, &url)
        .create_ticket(pb::CreateTicketRequest {
            title: "approved by a person".into(),
            approvals: vec![omoi_proto::common::Phase::Initial as i32],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .ticket
        .unwrap();
    let approved = tickets(&ada, &url)
        .approve(pb::ApproveRequest {
            ticket_id: gated.id.clone(),
            comment: "go".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .ticket
        .unwrap();
    assert_eq!(approved.gates[0].decided_by, "ada");
    omoi_tests::wait_ticket(
        &mesh.tickets(),
        &gated.id,
        omoi_proto::common::TicketStatus::Completed as i32,
    )
    .await;

    // Plaintext to a TLS port; TLS without a client certificate; a
    // certificate from another CA; a server checked against the wrong CA.
    let plain_url = url.replacen("https://", "http://", 1);
    let no_cert = Connector::new(
        None,
        &TlsArgs {
            tls_ca: Some(ca_pem.clone()),
            ..TlsArgs::default()
        },
    )
    .unwrap();
    let wrong_trust = Connector::new(None, &trusting(pki.leaf("client2", &ca), &pki.path("rogue-ca.pem"))).unwrap();
    let attempts = [
        ("plaintext", tickets(&Connector::default(), &plain_url)),
        ("no client certificate", tickets(&no_cert, &url)),
        (
            "client certificate of another CA",
            tickets(&Connector::new(None, &rogue).unwrap(), &url),
        ),
        ("server not trusted", tickets(&wrong_trust, &url)),
    ];
    for (what, mut client) in attempts {
        let err = create(&mut client, what).await.expect_err(what);
        assert!(
            matches!(
                err.code(),
                tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal | tonic::Code::Cancelled
            ),
            "{what}: {err:?}"
        );
    }
    let listed = tickets(&good, &url)
        .list_tickets(pb::ListTicketsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.tickets.len(), 2, "only the mTLS callers' tickets exist");

    mesh.stop().await.unwrap();
    infra.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_port_answers_health_in_plaintext_while_the_api_needs_tls() {
    let pki = Pki::new();
    let ca = pki.ca("ca");
    let service = pki.leaf("service", &ca);
    let infra = Infra::new().await.unwrap();
    let probe = free_port();
    let mut config = infra.task_queue_config();
    config.common.host.tls = service;
    config.common.host.probe_addr = Some(format!("127.0.0.1:{probe}").parse().unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let stop = omoi_runtime::CancellationToken::new();
    let served = tokio::spawn(omoi_task_queue::serve(
        config,
        omoi_runtime::grpc::incoming(listener),
        stop.clone(),
    ));
    // Readiness is read where the kubelet reads it: the plaintext probe port.
    let probe_url = format!("http://127.0.0.1:{probe}");
    omoi_tests::wait_serving(&probe_url, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(
        omoi_tests::health_status(&probe_url, omoi_task_queue::SERVICE_NAME).await,
        Ok(ServingStatus::Serving)
    );
    // Only health is there: the API is not served on the probe port.
    let err = omoi_tests::client(&probe_url)
        .get_queue_stats(omoi_proto::taskqueue::GetQueueStatsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented, "{err:?}");
    // The API port refuses plaintext and serves TLS to who trusts the CA.
    assert!(
        omoi_tests::health_status(&format!("http://127.0.0.1:{port}"), "")
            .await
            .is_err()
    );
    let trusted = Connector::new(None, &trusting(TlsArgs::default(), &pki.path("ca.pem"))).unwrap();
    let tls_url = format!("https://127.0.0.1:{port}");
    assert_eq!(trusted.health_status(&tls_url, "").await, Ok(ServingStatus::Serving));
    stop.cancel();
    served.await.unwrap().unwrap();
    infra.cleanup().await.unwrap();
}
