//! One conformance suite (`support/conformance.rs`), run against every
//! `Coordinator`: the in-process one, and the etcd one on a real etcd
//! (Debian's etcd-server, started per test on free loopback ports; the test
//! fails, never skips, when it is not installed).
#![allow(clippy::unwrap_used)]

#[path = "support/conformance.rs"]
mod conformance;
#[path = "support/etcd.rs"]
mod etcd;

/// Generates one test per case for a backend; `$make` builds a fresh
/// `(guard, coordinator)` pair, the guard kept alive for the test's length.
macro_rules! conformance_tests {
    ($backend:ident, $make:expr, [$($case:ident),* $(,)?]) => {
        mod $backend {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test]
                async fn $case() {
                    let (_guard, coordinator) = $make;
                    crate::conformance::$case(&coordinator).await;
                }
            )*
        }
    };
}

macro_rules! all_cases {
    ($backend:ident, $make:expr) => {
        conformance_tests!(
            $backend,
            $make,
            [
                register_keep_alive_and_list,
                lease_expiry_removes_node_and_claims,
                claim_is_compare_and_set,
                only_the_holder_releases,
                revoke_removes_everything,
                re_registering_rebinds_the_node_key,
                node_flags_outlive_leases,
                config_is_versioned_and_atomic,
                cluster_view_follows_the_cluster,
                cdn_health_is_stored_per_name,
                edges_follow_their_leases,
            ]
        );
    };
}

all_cases!(local, ((), weir_control_plane::LocalCoordinator::new()));

fn etcd_backend() -> (etcd::Etcd, weir_control_plane::EtcdCoordinator) {
    let server = etcd::Etcd::start();
    let config = weir_control_plane::EtcdConfig::new(vec![server.endpoint()]);
    let coordinator = weir_control_plane::EtcdCoordinator::new(config).unwrap();
    (server, coordinator)
}

all_cases!(etcd_single, crate::etcd_backend());

fn etcd_cluster_backend() -> (etcd::EtcdCluster, weir_control_plane::EtcdCoordinator) {
    let cluster = etcd::EtcdCluster::start(3);
    let config = weir_control_plane::EtcdConfig::new(cluster.endpoints());
    let coordinator = weir_control_plane::EtcdCoordinator::new(config).unwrap();
    (cluster, coordinator)
}

// The same semantics through a 3-member cluster (requests to followers are
// forwarded to the leader).
conformance_tests!(
    etcd_cluster,
    crate::etcd_cluster_backend(),
    [
        claim_is_compare_and_set,
        revoke_removes_everything,
        config_is_versioned_and_atomic
    ]
);
