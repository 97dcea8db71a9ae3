//! IP allow and deny lists (global, per client, per route) over a prefix table
//! (`prefix-trie`: longest-prefix match, no linear scan), swapped whole at runtime.
//!
//! Addresses are canonicalised first: an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) is
//! looked up, and a mapped CIDR (`::ffff:10.0.0.0/104`) is stored, as IPv4.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, PoisonError, RwLock};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use prefix_trie::PrefixMap;
use serde::Deserialize;

/// Most entries one list document may hold in total.
pub const MAX_ENTRIES: usize = 1_000_000;

/// A set of networks with longest-prefix lookups.
#[derive(Debug, Clone, Default)]
pub struct IpSet {
    v4: PrefixMap<Ipv4Net, ()>,
    v6: PrefixMap<Ipv6Net, ()>,
    len: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct IpListError {
    /// Path of the offending entry, e.g. `deny[3]` or `clients.app1.allow[0]`.
    pub field: String,
    pub reason: String,
}

/// Parses an address or CIDR (`192.0.2.1`, `192.0.2.0/24`, `2001:db8::/32`); host bits
/// set under the mask are an error (`192.0.2.1/24` is ambiguous).
pub fn parse_net(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    if s.len() > 64 {
        return Err("too long".into());
    }
    let net = if s.contains('/') {
        s.parse::<IpNet>()
            .map_err(|_| "not an IP address or CIDR".to_owned())?
    } else {
        IpNet::from(
            s.parse::<IpAddr>()
                .map_err(|_| "not an IP address or CIDR".to_owned())?,
        )
    };
    if net.trunc() != net {
        return Err(format!("host bits set (did you mean {}?)", net.trunc()));
    }
    Ok(canonical_net(net))
}

/// An IPv4-mapped IPv6 network (`::ffff:0:0/96` and longer) as its IPv4 network.
fn canonical_net(net: IpNet) -> IpNet {
    if let IpNet::V6(n) = net
        && n.prefix_len() >= 96
        && let IpAddr::V4(a) = IpAddr::V6(n.addr()).to_canonical()
        && let Ok(v4) = Ipv4Net::new(a, n.prefix_len() - 96)
    {
        return IpNet::V4(v4);
    }
    net
}

impl IpSet {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, net: IpNet) {
        let fresh = match canonical_net(net) {
            IpNet::V4(n) => self.v4.insert(n, ()).is_none(),
            IpNet::V6(n) => self.v6.insert(n, ()).is_none(),
        };
        if fresh {
            self.len += 1;
        }
    }

    /// Parses every entry; the first bad one is reported as `<field>[i]`.
    pub fn parse(field: &str, entries: &[String]) -> Result<Self, IpListError> {
        let mut s = Self::new();
        for (i, e) in entries.iter().enumerate() {
            let net = parse_net(e).map_err(|reason| IpListError {
                field: format!("{field}[{i}]"),
                reason,
            })?;
            s.insert(net);
        }
        Ok(s)
    }

    /// The most specific network of the set holding `ip`, if any.
    pub fn longest_match(&self, ip: IpAddr) -> Option<IpNet> {
        match ip.to_canonical() {
            IpAddr::V4(a) => self
                .v4
                .get_lpm(&Ipv4Net::from(a))
                .map(|(n, _)| IpNet::V4(*n)),
            IpAddr::V6(a) => self
                .v6
                .get_lpm(&Ipv6Net::from(a))
                .map(|(n, _)| IpNet::V6(*n)),
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.longest_match(ip).is_some()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// An allow and a deny list, as written in configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListsConfig {
    /// Non-empty: only these networks may pass in this scope.
    pub allow: Vec<String>,
    pub deny: Vec<String>,
}

/// IP access lists: global, per client id and per route (exact path).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct IpListsConfig {
    pub allow: Vec<String>,
    pub deny: Vec<String>,
    pub clients: BTreeMap<String, ListsConfig>,
    pub routes: BTreeMap<String, ListsConfig>,
    /// An address on both an allow and a deny list passes (default: deny wins).
    pub allow_wins: bool,
    /// Temporary automatic blocks (set by the runtime from the shared store, never from
    /// configuration): refused with reason `auto_block`, whatever the allow lists say.
    #[serde(skip)]
    pub blocked: Vec<String>,
}

#[derive(Debug, Clone, Default)]
struct Scope {
    allow: IpSet,
    deny: IpSet,
}

impl Scope {
    fn parse(prefix: &str, c: &ListsConfig) -> Result<Self, IpListError> {
        Ok(Self {
            allow: IpSet::parse(&format!("{prefix}allow"), &c.allow)?,
            deny: IpSet::parse(&format!("{prefix}deny"), &c.deny)?,
        })
    }
}

/// Why an address was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockReason {
    /// On a deny list.
    DenyList,
    /// A scope has an allow list and the address is not on it.
    NotAllowed,
    /// A temporary automatic block after repeated failures.
    AutoBlock,
    /// The address's country is not admitted (geolocation rules).
    Country,
}

impl BlockReason {
    pub fn as_str(self) -> &'static str {
        match self {
            BlockReason::DenyList => "deny_list",
            BlockReason::NotAllowed => "not_allowed",
            BlockReason::AutoBlock => "auto_block",
            BlockReason::Country => "country",
        }
    }
}

/// A validated, immutable set of lists. Swapped whole through [`IpControl`].
#[derive(Debug, Clone, Default)]
pub struct IpTables {
    global: Scope,
    clients: BTreeMap<String, Scope>,
    routes: BTreeMap<String, Scope>,
    allow_wins: bool,
    blocked: IpSet,
}

fn valid_scope_name(s: &str) -> bool {
    (1..=256).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic())
}

impl IpTables {
    /// Validates the whole document; the first malformed entry is named.
    pub fn build(cfg: &IpListsConfig) -> Result<Self, IpListError> {
        let total = cfg.allow.len()
            + cfg.deny.len()
            + cfg.blocked.len()
            + cfg
                .clients
                .values()
                .chain(cfg.routes.values())
                .map(|l| l.allow.len() + l.deny.len())
                .sum::<usize>();
        if total > MAX_ENTRIES {
            return Err(IpListError {
                field: "(lists)".into(),
                reason: format!("at most {MAX_ENTRIES} entries in total"),
            });
        }
        let global = Scope::parse(
            "",
            &ListsConfig {
                allow: cfg.allow.clone(),
                deny: cfg.deny.clone(),
            },
        )?;
        let mut clients = BTreeMap::new();
        for (id, l) in &cfg.clients {
            if !valid_scope_name(id) {
                return Err(IpListError {
                    field: format!("clients.{}", id.escape_debug()),
                    reason: "invalid client id".into(),
                });
            }
            clients.insert(id.clone(), Scope::parse(&format!("clients.{id}."), l)?);
        }
        let mut routes = BTreeMap::new();
        for (r, l) in &cfg.routes {
            if !r.starts_with('/') || !valid_scope_name(r) {
                return Err(IpListError {
                    field: format!("routes.{}", r.escape_debug()),
                    reason: "must be a path starting with /".into(),
                });
            }
            routes.insert(r.clone(), Scope::parse(&format!("routes.{r}."), l)?);
        }
        Ok(Self {
            global,
            clients,
            routes,
            allow_wins: cfg.allow_wins,
            blocked: IpSet::parse("blocked", &cfg.blocked)?,
        })
    }

    /// The decision for `ip` from a request by `client` (if known) to `route`.
    pub fn check(&self, ip: IpAddr, client: Option<&str>, route: &str) -> Result<(), BlockReason> {
        if self.blocked.contains(ip) {
            return Err(BlockReason::AutoBlock);
        }
        let scopes = [
            Some(&self.global),
            client.and_then(|c| self.clients.get(c)),
            self.routes.get(route),
        ];
        let mut denied = false;
        let mut allowed = false;
        let mut missing_allow = false;
        for s in scopes.into_iter().flatten() {
            if s.deny.contains(ip) {
                denied = true;
            }
            if !s.allow.is_empty() {
                if s.allow.contains(ip) {
                    allowed = true;
                } else {
                    missing_allow = true;
                }
            }
        }
        if denied && !(self.allow_wins && allowed) {
            return Err(BlockReason::DenyList);
        }
        if missing_allow {
            return Err(BlockReason::NotAllowed);
        }
        Ok(())
    }
}

/// The live lists: readers take a snapshot (one `Arc` clone), writers replace the whole
/// table atomically. A refused update leaves the old table in place.
#[derive(Debug, Default)]
pub struct IpControl {
    tables: RwLock<Arc<IpTables>>,
}

impl IpControl {
    pub fn new(tables: IpTables) -> Self {
        Self {
            tables: RwLock::new(Arc::new(tables)),
        }
    }

    pub fn snapshot(&self) -> Arc<IpTables> {
        self.tables
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn replace(&self, tables: IpTables) {
        *self.tables.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(tables);
    }

    /// Validates `cfg` and swaps it in; on error the current table stays.
    pub fn update(&self, cfg: &IpListsConfig) -> Result<(), IpListError> {
        let t = IpTables::build(cfg)?;
        self.replace(t);
        Ok(())
    }

    pub fn check(&self, ip: IpAddr, client: Option<&str>, route: &str) -> Result<(), BlockReason> {
        self.snapshot().check(ip, client, route)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn longest_prefix_membership_over_100k_entries() {
        let mut set = IpSet::new();
        // 100,000 /32s in 10.0.0.0/8 (every 7th address), nested under a /16 and a /8-wide v6.
        for i in 0..100_000_u32 {
            let a = std::net::Ipv4Addr::from(0x0a00_0000 + i * 7);
            set.insert(IpNet::V4(Ipv4Net::from(a)));
        }
        set.insert("172.16.0.0/16".parse().unwrap());
        set.insert("172.16.5.0/24".parse().unwrap());
        set.insert("2001:db8::/32".parse().unwrap());
        assert_eq!(set.len(), 100_003);
        assert!(set.contains(ip("10.0.0.0")));
        assert!(set.contains(ip("10.0.0.7")));
        assert!(!set.contains(ip("10.0.0.8")));
        let last = std::net::Ipv4Addr::from(0x0a00_0000 + 99_999 * 7);
        assert!(set.contains(IpAddr::V4(last)));
        assert!(!set.contains(IpAddr::V4(std::net::Ipv4Addr::from(
            0x0a00_0000 + 100_000 * 7
        ))));
        assert_eq!(
            set.longest_match(ip("172.16.5.9")).unwrap().to_string(),
            "172.16.5.0/24"
        );
        assert_eq!(
            set.longest_match(ip("172.16.6.9")).unwrap().to_string(),
            "172.16.0.0/16"
        );
        assert!(!set.contains(ip("172.17.0.1")));
        assert!(set.contains(ip("2001:db8:ffff::1")));
        assert!(!set.contains(ip("2001:db9::1")));
        // v4-mapped v6 addresses are looked up as v4.
        assert!(set.contains(ip("::ffff:10.0.0.7")));
        assert!(!set.contains(ip("::ffff:10.0.0.8")));
    }

    #[test]
    fn mapped_cidrs_are_stored_as_v4() {
        let set = IpSet::parse("deny", &strings(&["::ffff:192.0.2.0/120"])).unwrap();
        assert!(set.contains(ip("192.0.2.200")));
        assert!(set.contains(ip("::ffff:192.0.2.200")));
        assert!(!set.contains(ip("192.0.3.1")));
    }

    #[test]
    fn malformed_entries_name_the_field_and_keep_the_old_table() {
        let ctl = IpControl::new(
            IpTables::build(&IpListsConfig {
                deny: strings(&["203.0.113.0/24"]),
                ..Default::default()
            })
            .unwrap(),
        );
        for (cfg, field) in [
            (
                IpListsConfig {
                    deny: strings(&["192.0.2.0/24", "300.1.1.1"]),
                    ..Default::default()
                },
                "deny[1]",
            ),
            (
                IpListsConfig {
                    allow: strings(&["192.0.2.1/24"]),
                    ..Default::default()
                },
                "allow[0]",
            ),
            (
                IpListsConfig {
                    clients: BTreeMap::from([(
                        "app1".to_owned(),
                        ListsConfig {
                            allow: vec![],
                            deny: strings(&["10.0.0.0/8", "10.0.0.0/33"]),
                        },
                    )]),
                    ..Default::default()
                },
                "clients.app1.deny[1]",
            ),
            (
                IpListsConfig {
                    routes: BTreeMap::from([(
                        "/v1/admin".to_owned(),
                        ListsConfig {
                            allow: strings(&["fe80::/10", "::/129"]),
                            deny: vec![],
                        },
                    )]),
                    ..Default::default()
                },
                "routes./v1/admin.allow[1]",
            ),
        ] {
            let e = ctl.update(&cfg).unwrap_err();
            assert_eq!(e.field, field, "{e}");
            assert_eq!(
                ctl.check(ip("203.0.113.9"), None, "/"),
                Err(BlockReason::DenyList),
                "old table kept"
            );
        }
        ctl.update(&IpListsConfig::default()).unwrap();
        assert_eq!(ctl.check(ip("203.0.113.9"), None, "/"), Ok(()), "swapped");
    }

    #[test]
    fn scopes_combine_and_deny_wins_unless_configured() {
        let mut cfg = IpListsConfig {
            allow: vec![],
            deny: strings(&["198.51.100.0/24"]),
            clients: BTreeMap::from([(
                "partner".to_owned(),
                ListsConfig {
                    allow: strings(&["198.51.100.7", "192.0.2.0/24"]),
                    deny: vec![],
                },
            )]),
            routes: BTreeMap::from([(
                "/admin".to_owned(),
                ListsConfig {
                    allow: strings(&["10.0.0.0/8"]),
                    deny: strings(&["10.9.0.0/16"]),
                },
            )]),
            allow_wins: false,
            blocked: vec![],
        };
        let t = IpTables::build(&cfg).unwrap();
        assert_eq!(
            t.check(ip("198.51.100.7"), None, "/x"),
            Err(BlockReason::DenyList)
        );
        assert_eq!(
            t.check(ip("198.51.100.7"), Some("partner"), "/x"),
            Err(BlockReason::DenyList),
            "deny wins over the client's allow"
        );
        assert_eq!(t.check(ip("192.0.2.1"), Some("partner"), "/x"), Ok(()));
        assert_eq!(
            t.check(ip("203.0.113.1"), Some("partner"), "/x"),
            Err(BlockReason::NotAllowed),
            "a client allow list admits only its networks"
        );
        assert_eq!(t.check(ip("203.0.113.1"), Some("other"), "/x"), Ok(()));
        assert_eq!(t.check(ip("10.1.2.3"), None, "/admin"), Ok(()));
        assert_eq!(
            t.check(ip("10.9.2.3"), None, "/admin"),
            Err(BlockReason::DenyList)
        );
        assert_eq!(
            t.check(ip("11.0.0.1"), None, "/admin"),
            Err(BlockReason::NotAllowed)
        );
        assert_eq!(
            t.check(ip("::ffff:198.51.100.1"), None, "/x"),
            Err(BlockReason::DenyList),
            "v4-mapped v6 hits the v4 deny list"
        );
        cfg.allow_wins = true;
        let t = IpTables::build(&cfg).unwrap();
        assert_eq!(
            t.check(ip("198.51.100.7"), Some("partner"), "/x"),
            Ok(()),
            "allow_wins lets the client's allow override the global deny"
        );
        assert_eq!(
            t.check(ip("198.51.100.8"), None, "/x"),
            Err(BlockReason::DenyList)
        );
    }
}
