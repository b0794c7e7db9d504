//! Which address a call comes from: the TCP peer, or, when the peer is a trusted proxy, the
//! right-most address of `X-Forwarded-For` that no trusted proxy added.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

/// The client's address. `forwarded_for` holds every `X-Forwarded-For` header value in the
/// order received. `None` when the peer is trusted but the first untrusted hop in the header is
/// not an address: such a caller matches no allowlist.
pub fn resolve<'a>(
    peer: IpAddr,
    forwarded_for: impl Iterator<Item = &'a str>,
    trusted: &[IpNet],
) -> Option<IpAddr> {
    let peer = peer.to_canonical();
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        // Anyone can write the header; only a trusted proxy's word counts.
        return Some(peer);
    }
    let hops: Vec<&str> = forwarded_for
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|hop| !hop.is_empty())
        .collect();
    let mut client = peer;
    for hop in hops.iter().rev() {
        let ip = parse_hop(hop)?;
        client = ip;
        if !is_trusted(&ip) {
            return Some(ip);
        }
    }
    // Every hop is trusted: the left-most is as close to the client as the chain knows.
    Some(client)
}

/// One hop: `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1` or `[2001:db8::1]:443`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    hop.parse::<SocketAddr>()
        .ok()
        .map(|s| s.ip().to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_the_header_says() {
        let got = resolve(ip("203.0.113.9"), ["10.1.1.1"].into_iter(), &[]);
        assert_eq!(got, Some(ip("203.0.113.9")));
    }

    #[test]
    fn behind_trusted_proxies_the_right_most_untrusted_hop_is_the_client() {
        let trusted = nets(&["10.0.0.0/8"]);
        // The client forged the first entry; the proxies appended the real address.
        let header = ["6.6.6.6, 198.51.100.7", "10.0.0.2"];
        let got = resolve(ip("10.0.0.1"), header.into_iter(), &trusted);
        assert_eq!(got, Some(ip("198.51.100.7")));
    }

    #[test]
    fn hops_with_ports_and_v6_forms_are_read() {
        let trusted = nets(&["127.0.0.1/32"]);
        let got = resolve(ip("127.0.0.1"), ["[2001:db8::5]:443"].into_iter(), &trusted);
        assert_eq!(got, Some(ip("2001:db8::5")));
        let got = resolve(
            ip("::ffff:127.0.0.1"),
            ["192.0.2.1:80"].into_iter(),
            &trusted,
        );
        assert_eq!(got, Some(ip("192.0.2.1")));
    }

    #[test]
    fn garbage_in_the_untrusted_part_names_no_client() {
        let trusted = nets(&["127.0.0.1/32"]);
        assert_eq!(
            resolve(ip("127.0.0.1"), ["bogus"].into_iter(), &trusted),
            None
        );
    }

    #[test]
    fn a_trusted_peer_without_the_header_is_the_client() {
        let trusted = nets(&["127.0.0.1/32"]);
        assert_eq!(
            resolve(ip("127.0.0.1"), std::iter::empty(), &trusted),
            Some(ip("127.0.0.1"))
        );
    }
}
