//! Clusters: formation and leader failover.

use std::collections::BTreeSet;
use std::time::Duration;

use deltasync_testkit::NatsCluster;

use crate::info;

#[test]
fn a_three_node_cluster_forms_with_a_meta_leader() {
    let cluster = NatsCluster::start(3);

    let urls = cluster.urls();
    assert_eq!(urls.len(), 3);
    assert_eq!(urls.iter().collect::<BTreeSet<_>>().len(), 3, "{urls:?}");
    for (i, node) in cluster.nodes.iter().enumerate() {
        let info = info(node.port());
        assert_eq!(info["jetstream"], true, "INFO: {info}");
        assert_eq!(info["server_name"], cluster.node_name(i));
        assert_eq!(info["cluster"], "deltasync-test");
    }
    assert!(cluster.meta_leader().is_some());
}

#[test]
fn a_cluster_elects_a_new_meta_leader_when_the_leader_is_killed() {
    let mut cluster = NatsCluster::start(3);
    let old = cluster
        .meta_leader()
        .expect("a formed cluster has a leader");

    cluster.nodes[old].kill9();
    let new = cluster.wait_for_meta_leader(Duration::from_secs(30));

    assert_ne!(new, old);
    cluster.nodes[old].start_again();
    assert_eq!(info(cluster.nodes[old].port())["jetstream"], true);
}
