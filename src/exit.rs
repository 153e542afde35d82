//! Process exit codes (DESIGN §7 and §2.7). The systemd unit lists 77 and 78 in
//! `RestartPreventExitStatus=`: restarting cannot fix refused credentials or a bad config.

use std::process::ExitCode;

/// Clean stop (SIGTERM/SIGINT drained in time, `check-config` passed).
pub const OK: u8 = 0;
/// Runtime failure: anything that is neither usage, authentication nor configuration.
pub const RUNTIME_FAILURE: u8 = 1;
/// Usage error on the command line (clap's own exit code).
pub const USAGE: u8 = 2;
/// A deployment refused our credentials (`EX_NOPERM`).
pub const AUTH_REFUSED: u8 = 77;
/// Invalid configuration, including a source identity mismatch (`EX_CONFIG`).
pub const INVALID_CONFIG: u8 = 78;

/// Exit codes of `mongo-syncd validate` (DESIGN §2.7); 2, 77 and 78 keep their meaning.
pub mod validate {
    /// Source and destination are in sync.
    pub const IN_SYNC: u8 = 0;
    /// Drift found.
    pub const DRIFT: u8 = 1;
    /// Indeterminate: some ranges stayed unverified.
    pub const UNVERIFIED: u8 = 3;
    /// Validation could not run (unreachable deployment, no checkpoints, ...).
    pub const COULD_NOT_RUN: u8 = 4;
}

/// The daemon's exit statuses as a type, for code that prefers matching to constants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// [`OK`]
    Ok,
    /// [`RUNTIME_FAILURE`]
    RuntimeFailure,
    /// [`USAGE`]
    Usage,
    /// [`AUTH_REFUSED`]
    AuthRefused,
    /// [`INVALID_CONFIG`]
    InvalidConfig,
}

impl Exit {
    /// The numeric code.
    pub fn code(self) -> u8 {
        match self {
            Exit::Ok => OK,
            Exit::RuntimeFailure => RUNTIME_FAILURE,
            Exit::Usage => USAGE,
            Exit::AuthRefused => AUTH_REFUSED,
            Exit::InvalidConfig => INVALID_CONFIG,
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> Self {
        ExitCode::from(exit.code())
    }
}

/// Outcomes of `mongo-syncd validate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValidateExit {
    /// [`validate::IN_SYNC`]
    InSync,
    /// [`validate::DRIFT`]
    Drift,
    /// [`validate::UNVERIFIED`]
    Unverified,
    /// [`validate::COULD_NOT_RUN`]
    CouldNotRun,
}

impl ValidateExit {
    /// The numeric code.
    pub fn code(self) -> u8 {
        match self {
            ValidateExit::InSync => validate::IN_SYNC,
            ValidateExit::Drift => validate::DRIFT,
            ValidateExit::Unverified => validate::UNVERIFIED,
            ValidateExit::CouldNotRun => validate::COULD_NOT_RUN,
        }
    }
}

impl From<ValidateExit> for ExitCode {
    fn from(exit: ValidateExit) -> Self {
        ExitCode::from(exit.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_match_the_design() {
        let daemon: Vec<u8> = [
            Exit::Ok,
            Exit::RuntimeFailure,
            Exit::Usage,
            Exit::AuthRefused,
            Exit::InvalidConfig,
        ]
        .map(Exit::code)
        .to_vec();
        assert_eq!(daemon, [0, 1, 2, 77, 78]);
        let validate: Vec<u8> = [
            ValidateExit::InSync,
            ValidateExit::Drift,
            ValidateExit::Unverified,
            ValidateExit::CouldNotRun,
        ]
        .map(ValidateExit::code)
        .to_vec();
        assert_eq!(validate, [0, 1, 3, 4]);
    }
}
