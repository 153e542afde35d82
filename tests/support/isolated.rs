//! Processes under test in a process group of their own. Shared by the integration tests and
//! the soak engine (also built into `examples/soak.rs`).

use std::process::{Child, Command};

/// Starts a process under test in a process group of its own, killed when the thread that
/// started it ends (a test's runtime thread, which lives as long as the test).
///
/// Tests pause daemons with SIGSTOP, so job-control signals meant for the test's own group
/// must not reach them: the kernel sends SIGHUP and SIGCONT to every member of a process group
/// that becomes orphaned while one is stopped (the shell that started `cargo test` exiting is
/// enough; seen resuming a paused daemon 1.5–2.6 s into its pause), and Ctrl-C goes to the whole
/// foreground group.
pub fn spawn_isolated(cmd: &mut Command) -> std::io::Result<Child> {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0);
    // SAFETY: `prctl` is async-signal-safe and touches no memory of the parent; nothing else
    // runs between fork and exec.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
}
