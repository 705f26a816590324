//! A nats-server restarted under load (same store, same port): once gracefully, once with
//! SIGKILL. The producer and two consumers (one durable, one in memory) reconnect and go on.
//!
//! Talks to one nats-server through the producer and consumer libraries.

use crate::support::*;
use deltasync_producer::Producer;
use deltasync_testkit::NatsServer;
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_is_ridden_out_by_the_producer_and_both_consumers() {
    logs();
    let started = Instant::now();
    let mut server = NatsServer::start();
    let settings = settings(&server.url(), &unique("restart"), |s| {
        s.snapshot.every_envelopes = 300;
    });
    let producer = Producer::start(settings.clone()).await.unwrap();
    let model = Arc::new(Mutex::new(Model::default()));
    let load = Load::start(producer, model.clone(), 11, 2000);
    let dir = tempfile::tempdir().unwrap();
    let durable = InProcess::durable(settings.clone(), "restart-durable", dir.path());
    let memory = InProcess::memory(settings.clone(), "restart-memory");
    wait_for_commits(&model, &load, 300, "commits before the first restart").await;

    for (round, kill) in [(1, false), (2, true)] {
        let before = model.lock().unwrap().txns;
        tokio::task::block_in_place(|| {
            if kill {
                server.kill9();
                server.start_again();
            } else {
                server.restart();
            }
        });
        eprintln!(
            "restart {round} ({}): {before} transactions committed before it",
            if kill { "SIGKILL" } else { "SIGTERM" }
        );
        wait_for_commits(
            &model,
            &load,
            300,
            &format!("commits after restart {round}"),
        )
        .await;
    }

    let report = load.finish().await;
    if let Some((txn, e)) = &report.error {
        panic!(
            "a commit failed across the restarts ({} changes): {e}",
            txn.len()
        );
    }
    let p = report.producer.flush().await.unwrap();
    let model = model.lock().unwrap().clone();
    assert_eq!(
        p.digest,
        model.digest(),
        "the producer's digest is the model's"
    );
    let mut checked = 0;
    for c in [&durable, &memory] {
        checked += c.check(&p, &model, "after two server restarts").await;
        let s = c.replica.status();
        assert_eq!(
            s.decisions.keys().collect::<Vec<_>>(),
            vec!["bootstrap"],
            "replica {}: a server restart needs no re-snapshot ({:?})",
            s.id,
            s.decisions
        );
    }
    durable.stop().await;
    memory.stop().await;
    report.producer.shutdown().await.unwrap();
    eprintln!(
        "server restarts: {} transactions ({} changes) committed, {checked} entries checked, 0 \
         lost, {:.1?}",
        model.txns,
        model.changes,
        started.elapsed()
    );
}
