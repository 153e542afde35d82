//! Which partition a namespace belongs to (`ha.partitions`, DESIGN §2.12).
//!
//! A stable hash of the source namespace `db.coll` (FNV-1a, 64 bits) modulo the partition
//! count, unless a `ha.partition_overrides` entry names the namespace (the first match wins).
//! Stable means: the same on every host, every build and every release — instances that
//! disagree would both sync, or neither, a namespace. The layout (count and overrides) is
//! published by every instance so a disagreement is seen and refused (see `crate::ha::members`).

use super::{namespace::NamespacePattern, HaConfig};

/// The namespace → partition function of one configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partitioner {
    count: u32,
    overrides: Vec<(NamespacePattern, u32)>,
}

/// FNV-1a, 64 bits: simple, fixed by its specification, identical everywhere.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

impl Partitioner {
    pub fn new(count: u32, overrides: Vec<(NamespacePattern, u32)>) -> Partitioner {
        Partitioner {
            count: count.max(1),
            overrides,
        }
    }

    pub fn from_config(ha: &HaConfig) -> Partitioner {
        Partitioner::new(
            ha.partitions,
            ha.partition_overrides
                .iter()
                .map(|o| (o.namespaces.clone(), o.partition))
                .collect(),
        )
    }

    pub fn count(&self) -> u32 {
        self.count
    }

    /// The partition of source namespace `db.coll`.
    pub fn partition_of(&self, db: &str, coll: &str) -> u32 {
        if let Some((_, p)) = self.overrides.iter().find(|(pat, _)| pat.matches(db, coll)) {
            return *p;
        }
        let mut key = Vec::with_capacity(db.len() + coll.len() + 1);
        key.extend_from_slice(db.as_bytes());
        key.push(b'.');
        key.extend_from_slice(coll.as_bytes());
        (fnv1a(&key) % u64::from(self.count)) as u32
    }

    /// The partition of `db.coll` written as one string (database names have no dots).
    pub fn partition_of_ns(&self, ns: &str) -> u32 {
        let (db, coll) = ns.split_once('.').unwrap_or((ns, ""));
        self.partition_of(db, coll)
    }

    /// A fingerprint of the layout, compared between instances: `6:app.orders=2,logs.*=5`.
    pub fn layout(&self) -> String {
        let overrides: Vec<String> = self
            .overrides
            .iter()
            .map(|(pat, p)| format!("{}={p}", pat.as_str()))
            .collect();
        format!("{}:{}", self.count, overrides.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_fnv1a_as_specified() {
        // Reference values of FNV-1a 64 (the published test vectors).
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn a_namespace_always_lands_in_the_same_partition() {
        let p = Partitioner::new(6, vec![]);
        // Pinned: a change here moves every user's namespaces between leases.
        let pinned: Vec<u32> = ["app.orders", "app.users", "logs.events", "db.a.b"]
            .iter()
            .map(|ns| p.partition_of_ns(ns))
            .collect();
        let again: Vec<u32> = ["app.orders", "app.users", "logs.events", "db.a.b"]
            .iter()
            .map(|ns| {
                let (db, coll) = ns.split_once('.').unwrap();
                p.partition_of(db, coll)
            })
            .collect();
        assert_eq!(pinned, again);
        assert_eq!(
            pinned,
            vec![
                (fnv1a(b"app.orders") % 6) as u32,
                (fnv1a(b"app.users") % 6) as u32,
                (fnv1a(b"logs.events") % 6) as u32,
                (fnv1a(b"db.a.b") % 6) as u32,
            ]
        );
        assert!(pinned.iter().all(|p| *p < 6));
    }

    #[test]
    fn namespaces_spread_over_every_partition() {
        let p = Partitioner::new(6, vec![]);
        let mut counts = [0u32; 6];
        for i in 0..6_000 {
            counts[p.partition_of("app", &format!("c{i}")) as usize] += 1;
        }
        for c in counts {
            assert!((800..1200).contains(&c), "uneven: {counts:?}");
        }
    }

    #[test]
    fn an_override_wins_and_the_first_matching_one_is_used() {
        let p = Partitioner::new(
            4,
            vec![
                ("app.orders".parse().unwrap(), 3),
                ("app.*".parse().unwrap(), 1),
            ],
        );
        assert_eq!(p.partition_of("app", "orders"), 3);
        assert_eq!(p.partition_of("app", "users"), 1);
        assert_eq!(
            p.partition_of("logs", "x"),
            Partitioner::new(4, vec![]).partition_of("logs", "x")
        );
        assert_eq!(p.layout(), "4:app.orders=3,app.*=1");
    }

    #[test]
    fn one_partition_holds_everything() {
        let p = Partitioner::new(1, vec![]);
        assert_eq!(p.partition_of("any", "thing"), 0);
    }
}
