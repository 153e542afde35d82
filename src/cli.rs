//! Command line (DESIGN §4). `run` is the default subcommand: `mongo-syncd --config FILE` runs
//! the daemon. Usage errors exit 2 (clap's default).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::{config::DEFAULT_CONFIG_PATH, ops::telemetry::LogReloadHandle};

/// Keeps a destination MongoDB deployment continuously in sync with a source using change
/// streams.
#[derive(Debug, Parser)]
#[command(
    name = "mongo-syncd",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// What to do (default: run).
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Options of the default `run` command.
    #[command(flatten)]
    pub run: RunArgs,
}

impl Cli {
    /// The command to execute, with `run` filled in when none was given.
    pub fn into_command(self) -> Command {
        self.command.unwrap_or(Command::Run(self.run))
    }
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (the default).
    Run(RunArgs),
    /// Validate the config and print the effective config (secrets redacted) as TOML.
    CheckConfig(ConfigArgs),
    /// Run one validation pass against the daemon's checkpoints and exit (0 in sync, 1 drift,
    /// 3 unverified, 4 could not run).
    Validate(ValidateArgs),
    /// Self-contained demo: two in-process simulated replica sets, sample data, live writes,
    /// synced, with metrics on http.listen.
    Demo(DemoArgs),
}

/// `--config FILE`.
#[derive(Debug, Clone, Args)]
pub struct ConfigArgs {
    /// Config file (TOML); MONGO_SYNCD_<SECTION>__<KEY> environment variables override it.
    #[arg(long, short = 'c', value_name = "FILE", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
}

/// `run` options.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub config: ConfigArgs,

    /// Accept a source whose identity differs from the one recorded in the metadata database,
    /// and re-copy everything from it.
    #[arg(long)]
    pub reset_identity: bool,
}

/// `validate` options.
#[derive(Debug, Clone, Args)]
pub struct ValidateArgs {
    #[command(flatten)]
    pub config: ConfigArgs,

    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,

    /// How long to wait for the daemon's checkpoints to pass the validation reads.
    #[arg(long, value_name = "N", default_value_t = 60)]
    pub wait_seconds: u64,
}

/// `demo` options.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Stop after this many seconds (default: until SIGINT/SIGTERM).
    #[arg(long, value_name = "N")]
    pub duration_seconds: Option<u64>,

    /// Where to serve metrics, health and the API (default: the config default, 127.0.0.1:9290).
    #[arg(long, value_name = "ADDR")]
    pub http_listen: Option<SocketAddr>,
}

/// What `app::run` needs beyond the validated config.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The file the config came from, re-read on SIGHUP.
    pub config_path: PathBuf,
    /// `--reset-identity`.
    pub reset_identity: bool,
    /// Changes the log level on reload.
    pub log_reload: Option<LogReloadHandle>,
}

/// What `app::validate` needs beyond the validated config.
#[derive(Debug, Clone)]
pub struct ValidateOptions {
    /// The file the config came from.
    pub config_path: PathBuf,
    /// `--json`.
    pub json: bool,
    /// `--wait-seconds`.
    pub wait: Duration,
}

/// What `app::demo` needs (it builds its own config around two simulators).
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// `--duration-seconds`; `None` = until a signal.
    pub duration: Option<Duration>,
    /// `--http-listen`; `None` = `DEFAULT_HTTP_LISTEN`.
    pub http_listen: Option<SocketAddr>,
    /// Changes the log level at runtime.
    pub log_reload: Option<LogReloadHandle>,
}

impl ValidateArgs {
    /// The options passed to `app::validate`.
    pub fn options(&self) -> ValidateOptions {
        ValidateOptions {
            config_path: self.config.config.clone(),
            json: self.json,
            wait: Duration::from_secs(self.wait_seconds),
        }
    }
}

impl DemoArgs {
    /// The options passed to `app::demo`.
    pub fn options(&self, log_reload: Option<LogReloadHandle>) -> DemoOptions {
        DemoOptions {
            duration: self.duration_seconds.map(Duration::from_secs),
            http_listen: self.http_listen,
            log_reload,
        }
    }
}

impl RunArgs {
    /// The options passed to `app::run`.
    pub fn options(&self, log_reload: Option<LogReloadHandle>) -> RunOptions {
        RunOptions {
            config_path: self.config.config.clone(),
            reset_identity: self.reset_identity,
            log_reload,
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn parse(args: &[&str]) -> Result<Command, clap::Error> {
        Cli::try_parse_from(args).map(Cli::into_command)
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_is_the_default_subcommand() {
        match parse(&["mongo-syncd"]).unwrap() {
            Command::Run(args) => {
                assert_eq!(args.config.config, PathBuf::from(DEFAULT_CONFIG_PATH));
                assert!(!args.reset_identity);
            }
            other => panic!("expected run, got {other:?}"),
        }
        match parse(&["mongo-syncd", "--config", "x.toml", "--reset-identity"]).unwrap() {
            Command::Run(args) => {
                assert_eq!(args.config.config, PathBuf::from("x.toml"));
                assert!(args.reset_identity);
            }
            other => panic!("expected run, got {other:?}"),
        }
        match parse(&["mongo-syncd", "run", "-c", "y.toml"]).unwrap() {
            Command::Run(args) => assert_eq!(args.config.config, PathBuf::from("y.toml")),
            other => panic!("expected run, got {other:?}"),
        }
    }

    #[test]
    fn subcommands_parse() {
        match parse(&["mongo-syncd", "check-config", "--config", "a.toml"]).unwrap() {
            Command::CheckConfig(args) => assert_eq!(args.config, PathBuf::from("a.toml")),
            other => panic!("expected check-config, got {other:?}"),
        }
        match parse(&[
            "mongo-syncd",
            "validate",
            "--config",
            "a.toml",
            "--json",
            "--wait-seconds",
            "5",
        ])
        .unwrap()
        {
            Command::Validate(args) => {
                let opts = args.options();
                assert!(opts.json);
                assert_eq!(opts.wait, Duration::from_secs(5));
                assert_eq!(opts.config_path, PathBuf::from("a.toml"));
            }
            other => panic!("expected validate, got {other:?}"),
        }
        match parse(&[
            "mongo-syncd",
            "demo",
            "--duration-seconds",
            "3",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .unwrap()
        {
            Command::Demo(args) => {
                let opts = args.options(None);
                assert_eq!(opts.duration, Some(Duration::from_secs(3)));
                assert_eq!(opts.http_listen, Some("127.0.0.1:0".parse().unwrap()));
            }
            other => panic!("expected demo, got {other:?}"),
        }
    }

    #[test]
    fn usage_errors_are_exit_code_2() {
        for args in [
            &["mongo-syncd", "--bogus"][..],
            &["mongo-syncd", "demo", "--http-listen", "nope"],
            &["mongo-syncd", "validate", "--wait-seconds", "-1"],
            &["mongo-syncd", "--config", "a", "check-config"],
        ] {
            let err = parse(args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}: {err}");
        }
    }
}
