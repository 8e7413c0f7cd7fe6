//! Per-route API keys (`[http.route.auth]`): a request must carry `Authorization: Bearer KEY` with
//! one of the route's keys, or it gets 401 and nothing reaches the upstream. Keys are kept only as
//! SHA-256 digests and compared in constant time against every one (no early exit, no length
//! leak); the header is removed before forwarding unless the route keeps it; neither it nor the
//! key is ever logged. Failures count per source network ([`super::throttle`]).
use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION, WWW_AUTHENTICATE};
use hyper::StatusCode;
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

use super::proxy::{text, ResponseBody};
use crate::config::RouteAuth;

/// A route's compiled keys.
pub(crate) struct Keys {
    digests: Vec<[u8; 32]>,
    /// Forward `Authorization` upstream.
    pub(crate) keep_credentials: bool,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("count", &self.digests.len())
            .finish()
    }
}

fn digest(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

impl Keys {
    /// Compiles a route's `auth` section (its keys already gathered by the config loader).
    pub(crate) fn new(auth: &RouteAuth) -> Keys {
        Keys {
            digests: auth.keys.iter().map(|key| digest(key.as_bytes())).collect(),
            keep_credentials: auth.keep_credentials,
        }
    }

    /// Whether `headers` carry one of the keys as a Bearer credential.
    pub(crate) fn admit(&self, headers: &HeaderMap) -> bool {
        let mut values = headers.get_all(AUTHORIZATION).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            // None, or several: which one an upstream would read is anyone's guess.
            return false;
        };
        let Some(presented) = bearer(value) else {
            return false;
        };
        let presented = digest(presented);
        let matched = self.digests.iter().fold(Choice::from(0), |matched, key| {
            matched | key.ct_eq(&presented)
        });
        matched.into()
    }
}

/// The credential of a `Bearer` authorization header (the scheme is case-insensitive).
fn bearer(value: &HeaderValue) -> Option<&[u8]> {
    let value = value.as_bytes();
    let scheme = value.get(..7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let credential = value[7..].trim_ascii();
    (!credential.is_empty()).then_some(credential)
}

/// The answer to a request without a valid key (RFC 6750 §3).
pub(crate) fn unauthorized() -> hyper::Response<ResponseBody> {
    let mut response = text(
        StatusCode::UNAUTHORIZED,
        "401 this route needs an API key: Authorization: Bearer KEY".into(),
    );
    response.headers_mut().insert(
        WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"muxer\""),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(keys: &[&str]) -> Keys {
        Keys::new(&RouteAuth {
            keys: keys.iter().map(|key| key.to_string()).collect(),
            ..RouteAuth::default()
        })
    }

    fn headers(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        }
        headers
    }

    #[test]
    fn only_one_bearer_header_with_a_configured_key_is_admitted() {
        let route = keys(&["sk-one", "sk-two"]);
        assert!(route.admit(&headers(&["Bearer sk-one"])));
        assert!(route.admit(&headers(&["bearer   sk-two  "])));
        assert!(!route.admit(&headers(&[])));
        assert!(!route.admit(&headers(&["Bearer sk-three"])));
        assert!(!route.admit(&headers(&["Bearer sk-on"])));
        assert!(!route.admit(&headers(&["Basic sk-one"])));
        assert!(!route.admit(&headers(&["Bearer "])));
        assert!(!route.admit(&headers(&["Bearer sk-one", "Bearer sk-one"])));
    }
}
