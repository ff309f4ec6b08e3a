//! The `take_share` phase: the identified integration's place under its
//! `max_concurrent` ([`super::share::Share`]), waited for up to
//! `coupa.connection_wait_timeout`; the wait is the access line's
//! `slot_ms`.

use tokio::sync::OwnedSemaphorePermit;

use super::core::{Proxy, Trace};
use super::ProxyError;

impl Proxy {
    /// The identified integration's place under its cap, waiting up to
    /// `coupa.connection_wait_timeout`; `None` without integrations.
    pub(super) async fn take_share(
        &self,
        trace: &mut Trace,
    ) -> Result<Option<OwnedSemaphorePermit>, ProxyError> {
        let Some(integration) = &trace.integration else {
            return Ok(None);
        };
        let inner = &*self.inner;
        let asked = std::time::Instant::now();
        let taken = integration
            .share
            .acquire(inner.connection_wait_timeout)
            .await;
        trace.slot_wait += asked.elapsed();
        if let Some(spans) = &mut trace.spans {
            // (A field, not `note_wait`: `integration` borrows `trace`.)
            spans.wait("connection slot", asked, std::time::Instant::now());
        }
        match taken {
            Ok(permit) => Ok(Some(permit)),
            Err(at_cap) => {
                inner.metrics.integration_busy(&integration.name);
                Err(ProxyError::IntegrationBusy {
                    integration: integration.name.to_string(),
                    cap: at_cap.cap,
                    waited: at_cap.waited,
                })
            }
        }
    }
}
