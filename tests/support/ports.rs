//! Ports for daemons' HTTP listeners in tests and the soak.

/// A free port for a daemon's HTTP listener, taken below the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`): a port the kernel hands a simulator (`--port 0`) or an
/// outgoing connection can then never be this one between the check here and the daemon's
/// bind (with ports from `bind(0)`, parallel tests raced for them). Picked at random among up
/// to 10,000, so parallel tests and processes (the soak engine compiles this file too) rarely
/// pick the same one before it is bound.
pub fn free_port() -> u16 {
    use rand::Rng;
    let Some((first, span)) = ports_below_ephemeral() else {
        let any = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        return any.local_addr().unwrap().port();
    };
    let mut rng = rand::rng();
    for _ in 0..span {
        let port = (first + rng.random_range(0..span)) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {first}..{}", first + span);
}

/// The first port and the number of ports [`free_port`] picks from: up to 10,000 below the
/// ephemeral range (which starts at 32768 by default); `None` when fewer than 1,000 unprivileged
/// ports lie below it.
fn ports_below_ephemeral() -> Option<(u32, u32)> {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let first = ephemeral_low.saturating_sub(10_000).max(1_024);
    let span = ephemeral_low.saturating_sub(first);
    (span >= 1_000).then_some((first, span))
}
