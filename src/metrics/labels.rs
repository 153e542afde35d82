//! Typed label values. Every label that is not a namespace takes its values from one of these
//! enums, so the set of series is bounded by construction (STYLE.md convention 12).

use std::fmt;

macro_rules! label_enum {
    (
        $(#[$meta:meta])*
        $name:ident { $($(#[$vmeta:meta])* $variant:ident => $value:literal),+ $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// Every value, in exposition order; used to pre-initialise and remove series.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The label value as exported.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $value),+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

label_enum! {
    /// `op` label of `mongo_syncd_events_applied_total`.
    ApplyOp {
        Insert => "insert",
        Update => "update",
        Replace => "replace",
        Delete => "delete",
        /// drop, rename, dropDatabase, create, createIndexes, dropIndexes, modify.
        Ddl => "ddl",
    }
}

label_enum! {
    /// `state` label of `mongo_syncd_worker_state` (exactly one is 1 per namespace).
    WorkerState {
        Copying => "copying",
        Streaming => "streaming",
        Backoff => "backoff",
        Parked => "parked",
        Stopped => "stopped",
    }
}

label_enum! {
    /// `kind` label of `mongo_syncd_errors_total`. Fatal errors end the process and are not
    /// counted here.
    ErrorKindLabel {
        Transient => "transient",
        HistoryLost => "history_lost",
        Document => "document",
    }
}

label_enum! {
    /// `result` label of `mongo_syncd_validation_runs_total`.
    ValidationResult {
        Match => "match",
        Mismatch => "mismatch",
        Unverified => "unverified",
        Error => "error",
    }
}

label_enum! {
    /// `policy` label of `mongo_syncd_conflicts_total` (the `conflict.policy` values).
    ConflictPolicyLabel {
        SourceWins => "source-wins",
        DestinationWins => "destination-wins",
        NewestWins => "newest-wins",
        VersionWins => "version-wins",
        Journal => "journal",
    }
}

label_enum! {
    /// `outcome` label of `mongo_syncd_conflicts_total`.
    ConflictOutcome {
        Applied => "applied",
        Skipped => "skipped",
        Journaled => "journaled",
        /// DESIGN §2.6: a missing pre-image is a conflict with outcome `unknown`.
        Unknown => "unknown",
    }
}

label_enum! {
    /// `trigger` label of `mongo_syncd_force_syncs_total`.
    Trigger {
        /// SIGUSR1.
        Signal => "signal",
        /// `POST /api/v1/force-sync`.
        Http => "http",
    }
}

label_enum! {
    /// `result` label of `mongo_syncd_config_reloads_total` (an addition to DESIGN §6).
    ReloadResult {
        Success => "success",
        /// The new config was rejected; the old one stays in effect.
        Failure => "failure",
    }
}
