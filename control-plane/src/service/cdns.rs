//! The CDNs API: the configured CDNs with the health the prober found.

use super::{ApiError, ControlState, RequestId, observe};
use crate::cdn::CdnConfig;
use weir_protocol::coordinator::CdnHealth;

/// One configured CDN and what is known of its health.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CdnView {
    /// As configured.
    pub config: CdnConfig,
    /// What the prober stored (`None`: not probed yet).
    pub health: Option<CdnHealth>,
}

impl ControlState {
    /// The configured CDNs, in configured order, with their health.
    pub async fn list_cdns(&self, rid: &RequestId) -> Result<Vec<CdnView>, ApiError> {
        observe("ListCdns", rid, async {
            let cdns = self.live.get().cdns;
            let health = self.cdn_health.get();
            Ok(cdns
                .iter()
                .map(|c| CdnView {
                    config: c.clone(),
                    health: health.get(&c.name).cloned(),
                })
                .collect())
        })
        .await
    }
}
