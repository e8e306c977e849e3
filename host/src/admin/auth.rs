//! The admin's authentication (`admin { token-sha256 …; user … }`): a
//! bearer token or basic authentication, checked against SHA-256 digests
//! from the config.
//!
//! Only digests are kept, so the config file holds no secret in the clear;
//! a presented secret is hashed and the digests are compared in constant
//! time, so the time taken says nothing about how much of one matched.
//! SHA-256 is not a password-hashing scheme: a long random token (or
//! password) is what makes a leaked config file useless, as the docs say.

use base64::Engine as _;
use http::{HeaderMap, header};
use sha2::{Digest, Sha256};

use crate::config::AdminAuth;

/// The realm named in `WWW-Authenticate`.
pub(super) const REALM: &str = "cistern admin";

/// Whether `headers` carry a credential `auth` accepts. Without any
/// configured credential every request is let in.
pub(super) fn allowed(auth: &AdminAuth, headers: &HeaderMap) -> bool {
    if !auth.required() {
        return true;
    }
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let (scheme, credentials) = value.trim().split_once(' ').unwrap_or((value, ""));
    let credentials = credentials.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        let presented: [u8; 32] = Sha256::digest(credentials.as_bytes()).into();
        // Every digest is compared, matched or not.
        return auth
            .tokens
            .iter()
            .fold(false, |ok, t| ok | same_digest(t, &presented));
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(credentials) else {
            return false;
        };
        let Some((user, password)) = std::str::from_utf8(&decoded)
            .ok()
            .and_then(|s| s.split_once(':'))
        else {
            return false;
        };
        let presented: [u8; 32] = Sha256::digest(password.as_bytes()).into();
        return auth.users.iter().fold(false, |ok, u| {
            ok | (same_digest(&u.password_sha256, &presented) & (u.name == user))
        });
    }
    false
}

/// The challenges a 401 carries: one per kind of credential configured.
pub(super) fn challenges(auth: &AdminAuth) -> Vec<String> {
    let mut out = Vec::new();
    if !auth.tokens.is_empty() {
        out.push(format!("Bearer realm=\"{REALM}\""));
    }
    if !auth.users.is_empty() {
        out.push(format!("Basic realm=\"{REALM}\", charset=\"UTF-8\""));
    }
    out
}

/// Compares two digests without stopping at the first difference.
fn same_digest(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AdminUser;

    fn digest(s: &str) -> [u8; 32] {
        Sha256::digest(s.as_bytes()).into()
    }

    fn headers(authorization: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, authorization.parse().unwrap());
        h
    }

    #[test]
    fn tokens_and_users_are_checked_by_their_digests() {
        let auth = AdminAuth {
            tokens: vec![digest("s3cret-token")],
            users: vec![AdminUser {
                name: "ops".into(),
                password_sha256: digest("pw"),
            }],
        };
        let basic = |up: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(up)
            )
        };
        assert!(allowed(&auth, &headers("Bearer s3cret-token")));
        assert!(allowed(&auth, &headers("bearer  s3cret-token ")));
        assert!(allowed(&auth, &headers(&basic("ops:pw"))));
        for bad in [
            "Bearer s3cret-tokeN".to_owned(),
            "Bearer".to_owned(),
            basic("ops:pW"),
            basic("other:pw"),
            basic("ops"),
            "Basic !!!".to_owned(),
            "Digest x".to_owned(),
        ] {
            assert!(!allowed(&auth, &headers(&bad)), "{bad}");
        }
        assert!(!allowed(&auth, &HeaderMap::new()));
        assert!(allowed(&AdminAuth::NONE, &HeaderMap::new()));
        assert_eq!(challenges(&auth).len(), 2);
    }
}
