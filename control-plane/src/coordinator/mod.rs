//! The two implementations of [`Coordinator`]: [`LocalCoordinator`], held in
//! this process's memory (the embedded default of `weir dev`), and
//! [`EtcdCoordinator`], on an etcd cluster (for clusters of `weir node` and
//! `weir control` processes). Both follow the key layout and the semantics
//! written down in `weir_protocol::coordinator`; one conformance suite
//! (`control-plane/tests/coordinator_conformance.rs`) runs against both.

pub mod etcd;
mod local;

use std::sync::Arc;

use weir_protocol::coordinator::Coordinator;

use crate::election::ElectionBackend;

pub use etcd::{EtcdConfig, EtcdConfigError, EtcdCoordinator, parse_endpoints};
pub use local::LocalCoordinator;

/// The coordinator a process runs with: etcd when `etcd` names endpoints
/// (`URL[,URL…]`, as given to `--etcd`), otherwise an in-process one of its
/// own. Connects lazily: an unreachable etcd is no error here (calls fail with
/// `CoordError::Unavailable` until it answers); only a malformed endpoint list is.
pub fn from_flag(etcd: Option<&str>) -> Result<Arc<dyn Coordinator>, EtcdConfigError> {
    match etcd {
        None => {
            tracing::info!("coordinator: in-process (no --etcd): this process forms no cluster");
            Ok(Arc::new(LocalCoordinator::new()))
        }
        Some(list) => {
            let config = EtcdConfig::new(parse_endpoints(list)?);
            tracing::info!(endpoints = ?config.endpoints, "coordinator: etcd");
            Ok(Arc::new(EtcdCoordinator::new(config)?))
        }
    }
}

/// One coordinator seen both as a [`Coordinator`] and as an [`ElectionBackend`].
pub type CoordinatorWithElection = (Arc<dyn Coordinator>, Arc<dyn ElectionBackend>);

/// [`from_flag`], with the same coordinator also as an election backend
/// (for the control plane's singleton workers).
pub fn with_election_from_flag(
    etcd: Option<&str>,
) -> Result<CoordinatorWithElection, EtcdConfigError> {
    match etcd {
        None => {
            tracing::info!("coordinator: in-process (no --etcd): this process forms no cluster");
            let local = Arc::new(LocalCoordinator::new());
            Ok((local.clone(), local))
        }
        Some(list) => {
            let config = EtcdConfig::new(parse_endpoints(list)?);
            tracing::info!(endpoints = ?config.endpoints, "coordinator: etcd");
            let etcd = Arc::new(EtcdCoordinator::new(config)?);
            Ok((etcd.clone(), etcd))
        }
    }
}
