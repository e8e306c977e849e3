//! `X-Forwarded-For` and `Forwarded` (RFC 7239) toward upstreams: the
//! client's address, by the route's [`ForwardedFor`] mode.

use std::net::IpAddr;

use http::header::FORWARDED;
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::config::ForwardedFor;

/// `X-Forwarded-For`, the de-facto header most servers read.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Rewrites `headers` (a client's request, about to go upstream) to name
/// `client` as `mode` says.
pub(super) fn apply(headers: &mut HeaderMap, mode: ForwardedFor, client: IpAddr) {
    let client = canonical(client);
    match mode {
        ForwardedFor::Off => {}
        ForwardedFor::Replace => {
            headers.insert(&X_FORWARDED_FOR, ip_value(&client.to_string()));
            headers.insert(FORWARDED, ip_value(&forwarded_for(client)));
        }
        ForwardedFor::Append => {
            append(headers, &X_FORWARDED_FOR, &client.to_string());
            append(headers, &FORWARDED, &forwarded_for(client));
        }
    }
}

/// An IPv4 client on a dual-stack socket is named by its IPv4 address,
/// as the origin would see it without us.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// One `Forwarded` element: `for=` with an IPv6 address quoted in
/// brackets (RFC 7239 §6).
fn forwarded_for(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("for={v4}"),
        IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
    }
}

/// A header value made of address characters only.
fn ip_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).expect("addresses are visible ASCII")
}

/// Appends `item` to the list in `name`, joining the client's lines into
/// one (some servers read only the first line of a repeated header).
fn append(headers: &mut HeaderMap, name: &HeaderName, item: &str) {
    let mut list = String::new();
    for v in headers.get_all(name) {
        // A value that is not text cannot be extended faithfully: it is
        // dropped rather than passed on garbled.
        if let Ok(v) = v.to_str() {
            let v = v.trim();
            if !v.is_empty() {
                list.push_str(v);
                list.push_str(", ");
            }
        }
    }
    list.push_str(item);
    match HeaderValue::from_str(&list) {
        Ok(v) => {
            headers.insert(name, v);
        }
        Err(_) => {
            headers.insert(name, ip_value(item));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(mode: ForwardedFor, client: &str, sent: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in sent {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        apply(&mut h, mode, client.parse().unwrap());
        h
    }

    fn all(h: &HeaderMap, name: &str) -> Vec<String> {
        h.get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn replace_drops_what_the_client_claims() {
        let sent = [
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-for", "7.7.7.7"),
            ("forwarded", "for=6.6.6.6"),
        ];
        let h = run(ForwardedFor::Replace, "192.0.2.7", &sent);
        assert_eq!(all(&h, "x-forwarded-for"), ["192.0.2.7"]);
        assert_eq!(all(&h, "forwarded"), ["for=192.0.2.7"]);
    }

    #[test]
    fn append_keeps_a_trusted_clients_list() {
        let sent = [
            ("x-forwarded-for", "203.0.113.1"),
            ("x-forwarded-for", "10.0.0.2"),
            ("forwarded", "for=203.0.113.1;proto=https"),
        ];
        let h = run(ForwardedFor::Append, "2001:db8::5", &sent);
        assert_eq!(
            all(&h, "x-forwarded-for"),
            ["203.0.113.1, 10.0.0.2, 2001:db8::5"]
        );
        assert_eq!(
            all(&h, "forwarded"),
            ["for=203.0.113.1;proto=https, for=\"[2001:db8::5]\""]
        );
        let h = run(ForwardedFor::Append, "::ffff:10.1.2.3", &[]);
        assert_eq!(all(&h, "x-forwarded-for"), ["10.1.2.3"]);
        assert_eq!(all(&h, "forwarded"), ["for=10.1.2.3"]);
    }

    #[test]
    fn off_leaves_the_headers_as_sent() {
        let h = run(
            ForwardedFor::Off,
            "192.0.2.7",
            &[("x-forwarded-for", "6.6.6.6")],
        );
        assert_eq!(all(&h, "x-forwarded-for"), ["6.6.6.6"]);
        assert!(all(&h, "forwarded").is_empty());
    }
}
