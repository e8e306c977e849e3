//! This Cistern's hop in `Via` (RFC 9110 §7.6.3) and loop detection by it.
//!
//! Every Cistern names itself `1.1 cistern-<node id>` in `Via`, on the
//! requests it sends upstream and on the responses it sends back. A request
//! that arrives with our own pseudonym already in `Via` has been here
//! before: a loop. A request through another Cistern (a second tier in
//! series) carries that one's id, not ours, and goes on.

use std::hash::{BuildHasher, Hasher};

use http::{HeaderMap, HeaderValue, header};

/// Errors in a configured node id.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NodeIdError {
    /// Empty.
    #[error("a node id cannot be empty")]
    Empty,
    /// Longer than [`MAX_NODE_ID`].
    #[error("a node id is at most {MAX_NODE_ID} characters")]
    TooLong,
    /// A character that cannot be part of a `Via` pseudonym.
    #[error("{0:?} cannot be in a node id: use letters, digits, '-', '_' and '.'")]
    BadChar(char),
}

/// The longest node id accepted: it goes into every `Via`.
pub const MAX_NODE_ID: usize = 64;

/// Checks a configured node id: letters, digits, `-`, `_`, `.` (a subset
/// of the HTTP token characters, so the pseudonym is a valid token and
/// reads well in logs).
pub fn check_node_id(id: &str) -> Result<(), NodeIdError> {
    if id.is_empty() {
        return Err(NodeIdError::Empty);
    }
    if id.len() > MAX_NODE_ID {
        return Err(NodeIdError::TooLong);
    }
    match id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        Some(c) => Err(NodeIdError::BadChar(c)),
        None => Ok(()),
    }
}

/// This process's `Via` hop: the value it adds and the pseudonym it
/// recognises as itself.
#[derive(Debug, Clone)]
pub struct ViaHop {
    value: HeaderValue,
    /// `cistern-<id>`, the `received-by` part of `value`.
    pseudonym: Box<str>,
}

impl ViaHop {
    /// The hop for `node_id`, or for a random id when none is configured
    /// (unique per process, which is all loop detection needs).
    pub fn new(node_id: Option<&str>) -> ViaHop {
        let id = match node_id {
            Some(id) => id.to_owned(),
            None => random_id(),
        };
        let pseudonym = format!("cistern-{id}");
        let value = HeaderValue::from_str(&format!("1.1 {pseudonym}"))
            .expect("node ids are checked to be token characters");
        ViaHop {
            value,
            pseudonym: pseudonym.into_boxed_str(),
        }
    }

    /// The value to append to `Via`.
    pub fn value(&self) -> HeaderValue {
        self.value.clone()
    }

    /// `cistern-<id>`.
    pub fn pseudonym(&self) -> &str {
        &self.pseudonym
    }

    /// Whether `headers` already name this process in `Via`: the request
    /// has passed through here before.
    pub fn looped(&self, headers: &HeaderMap) -> bool {
        headers
            .get_all(header::VIA)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|hop| received_by(hop) == Some(&*self.pseudonym))
    }
}

/// The `received-by` of one `Via` element (`protocol RWS received-by
/// [RWS comment]`), without a port.
fn received_by(hop: &str) -> Option<&str> {
    let by = hop.split_ascii_whitespace().nth(1)?;
    Some(by.split(':').next().unwrap_or(by))
}

/// Twelve hex digits from the process's random hasher keys (seeded from
/// the OS), the process id and the time: unique enough to tell the
/// Cisterns of one path apart without a random-number crate.
fn random_id() -> String {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    format!("{:012x}", h.finish() & 0xffff_ffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn via(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(header::VIA, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn only_our_own_id_is_a_loop() {
        let hop = ViaHop::new(Some("edge-1"));
        assert_eq!(hop.value(), "1.1 cistern-edge-1");
        assert!(!hop.looped(&via(&[])));
        assert!(!hop.looped(&via(&["1.1 cistern-edge-2", "1.1 cistern"])));
        assert!(!hop.looped(&via(&["1.1 cistern-edge-10"])));
        assert!(hop.looped(&via(&["1.0 fred, 1.1 cistern-edge-1"])));
        assert!(hop.looped(&via(&["1.1 squid", "HTTP/1.1  cistern-edge-1:8080 (x)"])));
    }

    #[test]
    fn random_ids_differ_and_are_tokens() {
        let (a, b) = (ViaHop::new(None), ViaHop::new(None));
        assert_ne!(a.pseudonym(), b.pseudonym());
        let id = a.pseudonym().strip_prefix("cistern-").unwrap();
        assert_eq!(check_node_id(id), Ok(()));
    }

    #[test]
    fn node_ids_are_checked() {
        assert_eq!(check_node_id("edge-1.lan_a"), Ok(()));
        assert_eq!(check_node_id(""), Err(NodeIdError::Empty));
        assert_eq!(check_node_id("a b"), Err(NodeIdError::BadChar(' ')));
        assert_eq!(check_node_id("a,b"), Err(NodeIdError::BadChar(',')));
        assert_eq!(check_node_id(&"x".repeat(65)), Err(NodeIdError::TooLong));
    }
}
