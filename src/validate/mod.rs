//! Continuous validation with repair (DESIGN §2.7, §2.8).
//!
//! - [`digest`]: document and range digests, `_id` keys, field-order comparison;
//! - [`scan`]: the streamed reads (range scans over the `_id` index, lookups, counts, the
//!   change-stream check of a re-check window);
//! - [`pass`]: one pass over one namespace (hash or count mode, re-check, repair request);
//! - [`request`]: what a pass asks a namespace worker to do (re-copy a range; the worker's
//!   side is `worker::repair`);
//! - [`report`]: the reports in `<checkpoint.database>.validations` (also the pass progress);
//! - [`schedule`]: the daemon's scheduler (interval with jitter, SIGUSR2 / HTTP requests,
//!   resume after restart, metrics, status, logs).
//!
//! `mongo-syncd validate` runs a pass from the command line (`app::validate_command`).

pub mod digest;
pub mod pass;
pub mod report;
pub mod request;
pub mod scan;
pub mod schedule;
pub mod throttle;

use bson::Document;

pub use schedule::{Registration, ValidationService};

use crate::source::Namespace;

/// One namespace to validate.
#[derive(Debug, Clone)]
pub struct NamespacePlan {
    /// Source namespace.
    pub ns: Namespace,
    /// Destination namespace (after `sync.rename`).
    pub target: Namespace,
    /// The source collection's UUID (keys its checkpoint).
    pub uuid: Option<bson::Uuid>,
    /// The source collection's `listCollections` options (collation, validator, ...).
    pub options: Document,
}

/// The process-wide scan throttles (`validation.max_docs_per_second`), one per side.
#[derive(Debug, Default)]
pub struct Throttles {
    pub source: throttle::Throttle,
    pub destination: throttle::Throttle,
}

impl Throttles {
    pub fn new(per_second: u64) -> Throttles {
        Throttles {
            source: throttle::Throttle::new(per_second),
            destination: throttle::Throttle::new(per_second),
        }
    }

    pub fn set_rate(&self, per_second: u64) {
        self.source.set_rate(per_second);
        self.destination.set_rate(per_second);
    }
}
