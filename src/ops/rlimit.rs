//! The open-files limit (`RLIMIT_NOFILE`).
//!
//! Every HTTP connection, MongoDB connection and change-stream cursor's socket is a file
//! descriptor. Many systems start processes with a soft limit of 1024 while allowing far more:
//! the daemon raises its soft limit to the hard limit at start-up (what `LimitNOFILE=` grants
//! under systemd), and sizes the HTTP connection cap from the result (`http::connection_cap`),
//! so idle HTTP clients can never take the descriptors the driver needs to reconnect.

/// The soft and hard limits on open files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimit {
    pub soft: u64,
    pub hard: u64,
}

/// The current limits, if the platform reports them.
pub fn nofile() -> Option<NofileLimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `getrlimit` writes one `rlimit` through a pointer to a live, properly aligned
    // value; it reads nothing else.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (rc == 0).then_some(NofileLimit {
        soft: limit.rlim_cur,
        hard: limit.rlim_max,
    })
}

/// Raises the soft limit on open files to the hard limit; returns the limits before and
/// after. With an unlimited hard limit the soft limit stays as it was (setting it to
/// "unlimited" fails above the kernel's `nr_open`).
pub fn raise_nofile() -> std::io::Result<(NofileLimit, NofileLimit)> {
    let before = nofile().ok_or_else(std::io::Error::last_os_error)?;
    if before.soft >= before.hard || before.hard == libc::RLIM_INFINITY {
        return Ok((before, before));
    }
    let wanted = libc::rlimit {
        rlim_cur: before.hard,
        rlim_max: before.hard,
    };
    // SAFETY: `setrlimit` reads one `rlimit` through a pointer to a live value.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let after = nofile().ok_or_else(std::io::Error::last_os_error)?;
    Ok((before, after))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_ends_with_the_soft_limit_at_the_hard_limit() {
        let (before, after) = raise_nofile().unwrap();
        assert_eq!(after.hard, before.hard);
        if before.hard != libc::RLIM_INFINITY {
            assert_eq!(after.soft, after.hard);
        }
        assert_eq!(nofile(), Some(after));
    }
}
