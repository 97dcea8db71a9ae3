//! The client's address: the socket peer, unless the peer is a trusted proxy, in which
//! case the `Forwarded` (RFC 7239) or else `X-Forwarded-For` chain is walked from the
//! right, past every trusted hop, to the first untrusted one.
//!
//! Headers from an untrusted peer are ignored (anyone can write them). A hop that does
//! not parse (`unknown`, an obfuscated `_name`, garbage) ends the walk at the last
//! trusted address: nothing to its left can be trusted.

use std::net::IpAddr;

use http::HeaderMap;

use crate::ip::{IpListError, IpSet};

/// Most hops examined; a longer chain is cut at this many from the right.
pub const MAX_HOPS: usize = 32;
/// Most header bytes examined per field (all lines together).
pub const MAX_HEADER_BYTES: usize = 8 * 1024;

#[derive(Debug, Clone, Default)]
pub struct ClientIpResolver {
    trusted: IpSet,
}

impl ClientIpResolver {
    /// `trusted_proxies`: addresses and CIDRs of the proxies in front of this service.
    pub fn new(trusted_proxies: &[String]) -> Result<Self, IpListError> {
        Ok(Self {
            trusted: IpSet::parse("trusted_proxies", trusted_proxies)?,
        })
    }

    pub fn resolve(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.trusted.contains(peer) {
            return peer;
        }
        let hops = forwarded_hops(headers).or_else(|| xff_hops(headers));
        let Some(hops) = hops else {
            return peer;
        };
        let mut current = peer;
        for hop in hops.iter().rev().take(MAX_HOPS) {
            if !self.trusted.contains(current) {
                break;
            }
            match hop {
                Some(ip) => current = ip.to_canonical(),
                None => break,
            }
        }
        current
    }
}

/// All values of a header joined with `,` (list semantics), or None if absent or too big.
fn joined(headers: &HeaderMap, name: &str) -> Option<String> {
    let mut out = String::new();
    let mut any = false;
    for v in headers.get_all(name) {
        any = true;
        let s = v.to_str().ok()?;
        if out.len() + s.len() + 1 > MAX_HEADER_BYTES {
            return None;
        }
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(s);
    }
    any.then_some(out)
}

/// The `for=` of each `Forwarded` element, left to right; `None` for one that does not
/// name an address. An oversized or non-ASCII field counts as one unparsable hop.
fn forwarded_hops(headers: &HeaderMap) -> Option<Vec<Option<IpAddr>>> {
    if !headers.contains_key("forwarded") {
        return None;
    }
    let Some(text) = joined(headers, "forwarded") else {
        return Some(vec![None]);
    };
    let mut hops = Vec::new();
    for element in split_quoted(&text, ',') {
        let mut hop = None;
        for pair in split_quoted(element, ';') {
            let Some((k, v)) = pair.split_once('=') else {
                continue;
            };
            if k.trim().eq_ignore_ascii_case("for") {
                hop = Some(parse_node(v.trim()));
            }
        }
        hops.push(hop.flatten());
    }
    Some(hops)
}

fn xff_hops(headers: &HeaderMap) -> Option<Vec<Option<IpAddr>>> {
    if !headers.contains_key("x-forwarded-for") {
        return None;
    }
    let Some(text) = joined(headers, "x-forwarded-for") else {
        return Some(vec![None]);
    };
    Some(text.split(',').map(|h| parse_node(h.trim())).collect())
}

/// Splits on `sep` outside double quotes.
fn split_quoted(s: &str, sep: char) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    for (i, c) in s.char_indices() {
        if c == '"' {
            quoted = !quoted;
        } else if c == sep && !quoted {
            out.push(&s[start..i]);
            start = i + c.len_utf8();
        }
    }
    out.push(&s[start..]);
    out
}

/// An RFC 7239 node (`192.0.2.1`, `"192.0.2.1:80"`, `"[2001:db8::1]:443"`) or a bare
/// X-Forwarded-For entry. Anything else (`unknown`, `_hidden`) is `None`.
fn parse_node(v: &str) -> Option<IpAddr> {
    let v = v.strip_prefix('"').unwrap_or(v);
    let v = v.strip_suffix('"').unwrap_or(v);
    if let Some(rest) = v.strip_prefix('[') {
        let (addr, _port) = rest.split_once(']')?;
        return addr.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6);
    }
    if let Ok(ip) = v.parse::<IpAddr>() {
        return Some(ip);
    }
    // IPv4 with a port.
    let (addr, port) = v.rsplit_once(':')?;
    if port.bytes().all(|b| b.is_ascii_digit()) {
        return addr.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolver() -> ClientIpResolver {
        ClientIpResolver::new(&["10.0.0.0/8".to_owned(), "2001:db8:ffff::/48".to_owned()]).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn untrusted_peers_cannot_spoof() {
        let r = resolver();
        let h = headers(&[("x-forwarded-for", "1.2.3.4"), ("forwarded", "for=5.6.7.8")]);
        assert_eq!(r.resolve(ip("203.0.113.5"), &h), ip("203.0.113.5"));
    }

    #[test]
    fn trusted_chain_is_walked_from_the_right_to_the_first_untrusted_hop() {
        let r = resolver();
        // client spoofs 6.6.6.6; real client 198.51.100.1; two trusted proxies.
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 198.51.100.1, 10.1.1.1")]);
        assert_eq!(r.resolve(ip("10.0.0.2"), &h), ip("198.51.100.1"));
        // Several header lines form one list.
        let h = headers(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-for", "198.51.100.1"),
        ]);
        assert_eq!(r.resolve(ip("10.0.0.2"), &h), ip("198.51.100.1"));
        // All hops trusted: the leftmost.
        let h = headers(&[("x-forwarded-for", "10.3.3.3, 10.1.1.1")]);
        assert_eq!(r.resolve(ip("10.0.0.2"), &h), ip("10.3.3.3"));
        // No header: the peer.
        assert_eq!(r.resolve(ip("10.0.0.2"), &HeaderMap::new()), ip("10.0.0.2"));
    }

    #[test]
    fn forwarded_is_preferred_and_its_quoted_forms_parse() {
        let r = resolver();
        let h = headers(&[
            (
                "forwarded",
                "for=6.6.6.6, for=\"[2001:db8:cafe::17]:4711\";proto=https, for=\"10.2.2.2:8080\";by=10.0.0.1",
            ),
            ("x-forwarded-for", "7.7.7.7"),
        ]);
        assert_eq!(r.resolve(ip("10.0.0.2"), &h), ip("2001:db8:cafe::17"));
        let h = headers(&[("forwarded", "For=192.0.2.60;proto=http;by=203.0.113.43")]);
        assert_eq!(r.resolve(ip("2001:db8:ffff::1"), &h), ip("192.0.2.60"));
        // A v4-mapped trusted peer is recognised.
        assert_eq!(r.resolve(ip("::ffff:10.0.0.2"), &h), ip("192.0.2.60"));
    }

    #[test]
    fn malformed_hops_stop_the_walk_at_the_last_trusted_address() {
        let r = resolver();
        for bad in [
            "for=unknown",
            "for=_hidden",
            "for=\"[2001:db8::1\"",
            "for=",
            "garbage",
            "for=1.2.3.4:port",
            ";;;,,,",
        ] {
            let h = headers(&[("forwarded", bad)]);
            assert_eq!(r.resolve(ip("10.0.0.2"), &h), ip("10.0.0.2"), "{bad}");
        }
        let h = headers(&[("x-forwarded-for", "1.2.3.4, not-an-ip, 10.1.1.1")]);
        assert_eq!(r.resolve(ip("10.0.0.2"), &h), ip("10.1.1.1"));
        let long = vec!["10.1.1.1"; 5_000].join(",");
        let h = headers(&[("x-forwarded-for", &long)]);
        assert_eq!(r.resolve(ip("10.0.0.2"), &h), ip("10.0.0.2"), "oversized");
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            http::HeaderValue::from_bytes(b"1.2.3.4\xff").unwrap(),
        );
        assert_eq!(r.resolve(ip("10.0.0.2"), &h), ip("10.0.0.2"), "non-ASCII");
    }

    #[test]
    fn bad_proxy_cidr_is_named() {
        let e = ClientIpResolver::new(&["10.0.0.0/8".into(), "10.0.0.0/40".into()]).unwrap_err();
        assert_eq!(e.field, "trusted_proxies[1]");
    }
}
