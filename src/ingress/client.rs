//! Who the client is: the address every per-source rule applies to.
//!
//! Behind a reverse proxy every TCP peer is the proxy. A peer listed in
//! `ingress.trusted_proxies` may name the client instead: with `proxy_protocol`, in the
//! PROXY header at the start of the connection; on every request, in `X-Forwarded-For`.
//! The client address is then the rightmost address of that chain that is not itself a
//! trusted proxy: addresses further left were written by the client and prove nothing.
//! An untrusted peer's forwarding headers are ignored, so nobody can pick the address
//! `allow_ips`, the failed-request budget, the per-source connection cap and the `peer`
//! log field see.
//!
//! Per-source state (the connection count here, the failed-request budget in the
//! handler) is keyed by [`source_key`]: an IPv6 client usually holds a whole /64.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use axum::http::HeaderMap;
use ipnet::IpNet;

/// The client address of a request, after trusted proxies (a request extension set by
/// the connection server, read by the handler).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

/// Lets a request end its connection (a request extension, like [`ClientAddr`]): a
/// source past its failed-request budget is answered 429 and disconnected, on HTTP/2
/// too, where a `Connection: close` header does not exist.
#[derive(Debug, Clone, Default)]
pub struct ConnControl {
    close: tokio_util::sync::CancellationToken,
}

impl ConnControl {
    /// Asks the connection to close once the answer under way is sent.
    pub fn close(&self) {
        self.close.cancel();
    }

    /// Resolves once [`ConnControl::close`] was called.
    pub async fn closing(&self) {
        self.close.cancelled().await;
    }
}

/// The header a trusted proxy appends the address of its own peer to.
pub const X_FORWARDED_FOR: &str = "x-forwarded-for";

/// The key a source is counted under: the address, or the /64 of an IPv6 address (so
/// rotating addresses inside one's prefix neither resets a budget nor grows a table).
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        ip @ IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & (!0u128 << 64);
            IpAddr::V6(prefix.into())
        }
    }
}

/// Whether `ip` is one of `proxies`.
pub fn trusted(ip: IpAddr, proxies: &[IpNet]) -> bool {
    proxies.iter().any(|n| n.contains(&ip))
}

/// The client address of a request that arrived on a connection from `conn_client` (the
/// TCP peer, or the address a PROXY header named): while the address in hand is a
/// trusted proxy, the next address to the left in `X-Forwarded-For` is taken. An entry
/// that is not an address ends the walk at the last trusted hop.
pub fn forwarded_client(conn_client: IpAddr, headers: &HeaderMap, proxies: &[IpNet]) -> IpAddr {
    let mut client = conn_client.to_canonical();
    if !trusted(client, proxies) {
        return client;
    }
    // Several header lines form one list, in order (RFC 9110 5.3). Lines are split as
    // bytes: a line is not skipped because the client put a byte that is not text into
    // its part of it (a proxy appends the address it saw to that same line).
    let hops: Vec<&[u8]> = headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .collect();
    for hop in hops.iter().rev() {
        let Some(ip) = std::str::from_utf8(hop).ok().and_then(parse_hop) else {
            return client;
        };
        client = ip.to_canonical();
        if !trusted(client, proxies) {
            return client;
        }
    }
    client
}

/// One `X-Forwarded-For` entry: `203.0.113.7`, `203.0.113.7:4711`, `2001:db8::1` or
/// `[2001:db8::1]:4711`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    hop.parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| {
            hop.strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .and_then(|h| h.parse().ok())
        })
}

/// Open connections per source, for `max_connections_per_ip`.
#[derive(Debug, Default)]
pub struct PerSource {
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One counted connection; dropping it gives the place back.
#[derive(Debug)]
pub struct SourceSlot {
    table: Arc<PerSource>,
    key: IpAddr,
}

impl PerSource {
    /// Counts a connection from `ip`, unless `max` are already open from its source.
    pub fn take(table: &Arc<Self>, ip: IpAddr, max: usize) -> Option<SourceSlot> {
        let key = source_key(ip);
        let mut open = table.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(key).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            table: Arc::clone(table),
            key,
        })
    }

    /// Connections open from `ip`'s source now.
    #[cfg(test)]
    fn open_from(&self, ip: IpAddr) -> usize {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.get(&source_key(ip)).copied().unwrap_or(0)
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut open = self.table.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                // Entries live only while connections do: the table cannot grow with the
                // number of addresses ever seen.
                open.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(X_FORWARDED_FOR, v.parse().unwrap());
        }
        h
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn an_untrusted_peer_cannot_name_the_client() {
        let proxies = nets(&["127.0.0.1/32"]);
        let got = forwarded_client(ip("198.51.100.9"), &xff(&["203.0.113.7"]), &proxies);
        assert_eq!(got, ip("198.51.100.9"));
    }

    #[test]
    fn a_trusted_proxy_names_the_rightmost_untrusted_hop() {
        let proxies = nets(&["127.0.0.1/32", "10.0.0.0/8"]);
        // The client claimed 1.1.1.1; the first proxy saw 203.0.113.7; an inner proxy
        // (10.0.0.5) forwarded to the one in front of the relay.
        let h = xff(&["1.1.1.1, 203.0.113.7", "10.0.0.5"]);
        assert_eq!(
            forwarded_client(ip("127.0.0.1"), &h, &proxies),
            ip("203.0.113.7")
        );
    }

    #[test]
    fn ports_brackets_and_mapped_addresses_are_understood() {
        let proxies = nets(&["127.0.0.1/32"]);
        for (value, want) in [
            ("203.0.113.7:4711", "203.0.113.7"),
            ("[2001:db8::1]:443", "2001:db8::1"),
            (" 2001:db8::2 ", "2001:db8::2"),
            ("::ffff:203.0.113.8", "203.0.113.8"),
        ] {
            assert_eq!(
                forwarded_client(ip("127.0.0.1"), &xff(&[value]), &proxies),
                ip(want),
                "{value}"
            );
        }
    }

    #[test]
    fn a_client_cannot_hide_the_address_the_proxy_appended_behind_bytes_that_are_not_text() {
        let proxies = nets(&["127.0.0.1/32"]);
        let mut h = HeaderMap::new();
        // nginx's `$proxy_add_x_forwarded_for`: the client's header, then the address
        // nginx saw, on one line.
        h.append(
            X_FORWARDED_FOR,
            axum::http::HeaderValue::from_bytes(b"1.1.1.1\x80, 203.0.113.7").unwrap(),
        );
        assert_eq!(
            forwarded_client(ip("127.0.0.1"), &h, &proxies),
            ip("203.0.113.7")
        );
    }

    #[test]
    fn garbage_stops_at_the_last_trusted_hop() {
        let proxies = nets(&["127.0.0.0/8"]);
        let h = xff(&["203.0.113.7, unknown, 127.0.0.9"]);
        assert_eq!(
            forwarded_client(ip("127.0.0.1"), &h, &proxies),
            ip("127.0.0.9")
        );
        // No header at all: the proxy itself is the client.
        assert_eq!(
            forwarded_client(ip("127.0.0.1"), &HeaderMap::new(), &proxies),
            ip("127.0.0.1")
        );
    }

    #[test]
    fn ipv6_sources_are_counted_per_64() {
        let a = ip("2001:db8:1:2:aaaa::1");
        let b = ip("2001:db8:1:2:bbbb::9");
        let c = ip("2001:db8:1:3::1");
        assert_eq!(source_key(a), source_key(b));
        assert_ne!(source_key(a), source_key(c));
        assert_eq!(source_key(ip("203.0.113.7")), ip("203.0.113.7"));
        assert_eq!(source_key(ip("::ffff:203.0.113.7")), ip("203.0.113.7"));
    }

    #[test]
    fn the_per_source_cap_counts_and_gives_back() {
        let table = Arc::new(PerSource::default());
        let a = ip("203.0.113.7");
        let first = PerSource::take(&table, a, 2).unwrap();
        let _second = PerSource::take(&table, a, 2).unwrap();
        assert!(
            PerSource::take(&table, a, 2).is_none(),
            "third over a cap of 2"
        );
        assert!(PerSource::take(&table, ip("203.0.113.8"), 2).is_some());
        drop(first);
        assert_eq!(table.open_from(a), 1);
        assert!(PerSource::take(&table, a, 2).is_some());
    }
}
