//! Connections the daemon holds open to each cluster, counted from the driver's connection-pool
//! (CMAP) events, for `/api/v1/status` and `mongo_syncd_connections{side}` (issue 11 item 8):
//! an operator sees what the stream plan costs the source, and a pool that makes streams queue
//! shows as a count pinned at `max_pool_size`. The driver's monitoring connections (one or two
//! per server, outside the pool) are not counted.

use mongodb::{
    event::{cmap::CmapEvent, EventHandler},
    options::ClientOptions,
};
use prometheus::{IntGauge, IntGaugeVec, Opts};

use crate::metrics::{Metrics, CONNECTIONS, LABEL_SIDE};

pub use crate::status::{ConnectionCounts, OpenConnections};

/// Registers `mongo_syncd_connections{side}` (once per registry; both sides at 0).
fn gauges(metrics: &Metrics) -> (IntGauge, IntGauge) {
    let vec = IntGaugeVec::new(
        Opts::new(
            CONNECTIONS,
            "Pooled connections the daemon holds open to each cluster, by side (source, destination).",
        ),
        &[LABEL_SIDE],
    )
    .expect("valid metric");
    let _ = metrics.registry().register(Box::new(vec.clone()));
    (
        vec.with_label_values(&["source"]),
        vec.with_label_values(&["destination"]),
    )
}

/// Makes both clients count their connections into `counts` and the metric.
pub fn count_connections(
    source: &mut ClientOptions,
    destination: &mut ClientOptions,
    counts: &ConnectionCounts,
    metrics: &Metrics,
) {
    let (source_gauge, destination_gauge) = gauges(metrics);
    source.cmap_event_handler = Some(handler(counts.source.clone(), source_gauge));
    destination.cmap_event_handler = Some(handler(counts.destination.clone(), destination_gauge));
}

fn handler(open: OpenConnections, gauge: IntGauge) -> EventHandler<CmapEvent> {
    EventHandler::callback(move |event: CmapEvent| {
        let delta = match event {
            CmapEvent::ConnectionCreated(_) => 1,
            CmapEvent::ConnectionClosed(_) => -1,
            _ => return,
        };
        let now = open.add(delta);
        gauge.set(now);
    })
}
