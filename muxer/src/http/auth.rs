//! Per-route credentials (`[http.route.auth]`): a request must carry `Authorization: Bearer KEY`
//! with one of the route's keys, or `Basic` credentials of one of its users, or it gets 401 and
//! nothing reaches the upstream. Keys are kept only as SHA-256 digests and compared in constant
//! time against every one (no early exit, no length leak). Passwords are checked against argon2id
//! hashes on the blocking pool (a check costs tens of milliseconds by design, which must not stall
//! a worker); a credential that passed is remembered as a digest, so a client's later requests
//! cost a hash, not an argon2 run. The header is removed before forwarding unless the route keeps
//! it; neither it nor the credential is ever logged. Failures count per source network
//! ([`super::throttle`]).
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION, WWW_AUTHENTICATE};
use hyper::StatusCode;
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

use super::proxy::{text, ResponseBody};
use crate::config::RouteAuth;

/// Basic credentials that passed their argon2 check, remembered at most.
const MAX_REMEMBERED: usize = 1024;

/// A route's compiled keys and users.
pub(crate) struct Keys {
    digests: Vec<[u8; 32]>,
    /// `(user, argon2 PHC hash)`.
    users: Arc<Vec<(String, String)>>,
    /// Digests of `user:password` pairs that passed.
    verified: Mutex<HashSet<[u8; 32]>>,
    /// Forward `Authorization` upstream.
    pub(crate) keep_credentials: bool,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("keys", &self.digests.len())
            .field("users", &self.users.len())
            .finish()
    }
}

fn digest(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

impl Keys {
    /// Compiles a route's `auth` section (its keys and users already gathered by the config
    /// loader).
    pub(crate) fn new(auth: &RouteAuth) -> Keys {
        Keys {
            digests: auth.keys.iter().map(|key| digest(key.as_bytes())).collect(),
            users: Arc::new(auth.users.clone()),
            verified: Mutex::new(HashSet::new()),
            keep_credentials: auth.keep_credentials,
        }
    }

    /// Whether `headers` carry one of the keys as a Bearer credential, or a user's password.
    pub(crate) async fn admit(&self, headers: &HeaderMap) -> bool {
        let mut values = headers.get_all(AUTHORIZATION).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            // None, or several: which one an upstream would read is anyone's guess.
            return false;
        };
        match credential(value, b"bearer ") {
            Some(presented) => self.key_matches(presented),
            None => match credential(value, b"basic ") {
                Some(encoded) => self.password_matches(encoded).await,
                None => false,
            },
        }
    }

    fn key_matches(&self, presented: &[u8]) -> bool {
        let presented = digest(presented);
        let matched = self.digests.iter().fold(Choice::from(0), |matched, key| {
            matched | key.ct_eq(&presented)
        });
        matched.into()
    }

    async fn password_matches(&self, encoded: &[u8]) -> bool {
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded) else {
            return false;
        };
        let remembered = digest(&decoded);
        if self.remembered().contains(&remembered) {
            return true;
        }
        let Some(colon) = decoded.iter().position(|&byte| byte == b':') else {
            return false;
        };
        let (user, password) = (decoded[..colon].to_vec(), decoded[colon + 1..].to_vec());
        let users = Arc::clone(&self.users);
        // An argon2 check takes tens of milliseconds by design: never on a worker thread.
        let checked = tokio::task::spawn_blocking(move || verify(&users, &user, &password)).await;
        let passed = checked.unwrap_or(false);
        if passed {
            let mut remembered_set = self.remembered();
            if remembered_set.len() >= MAX_REMEMBERED {
                remembered_set.clear();
            }
            remembered_set.insert(remembered);
        }
        passed
    }

    fn remembered(&self) -> std::sync::MutexGuard<'_, HashSet<[u8; 32]>> {
        self.verified
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// The `WWW-Authenticate` challenges a 401 from this route carries.
    fn challenges(&self) -> impl Iterator<Item = HeaderValue> {
        let bearer =
            (!self.digests.is_empty()).then(|| HeaderValue::from_static("Bearer realm=\"muxer\""));
        let basic = (!self.users.is_empty())
            .then(|| HeaderValue::from_static("Basic realm=\"muxer\", charset=\"UTF-8\""));
        bearer.into_iter().chain(basic)
    }

    /// The answer to a request without valid credentials (RFC 6750 §3, RFC 7617).
    pub(crate) fn unauthorized(&self) -> hyper::Response<ResponseBody> {
        let mut response = text(
            StatusCode::UNAUTHORIZED,
            "401 this route needs credentials: Authorization: Bearer KEY (or Basic)".into(),
        );
        for challenge in self.challenges() {
            response.headers_mut().append(WWW_AUTHENTICATE, challenge);
        }
        response
    }
}

/// Whether `password` is `user`'s (its argon2 hash). Every user's name is compared, so timing
/// does not tell which names exist.
fn verify(users: &[(String, String)], user: &[u8], password: &[u8]) -> bool {
    use argon2::PasswordVerifier as _;
    let found = users.iter().fold(None, |found, (name, hash)| {
        let same: bool = name.as_bytes().ct_eq(user).into();
        if same {
            Some(hash)
        } else {
            found
        }
    });
    let Some(hash) = found.and_then(|hash| argon2::PasswordHash::new(hash).ok()) else {
        return false;
    };
    argon2::Argon2::default()
        .verify_password(password, &hash)
        .is_ok()
}

/// Makes the argon2id hash `muxer hash-password` prints (a fresh random salt each time).
pub fn hash_password(password: &[u8]) -> Result<String, argon2::password_hash::Error> {
    use argon2::password_hash::{rand_core::OsRng, PasswordHasher as _, SaltString};
    let salt = SaltString::generate(&mut OsRng);
    argon2::Argon2::default()
        .hash_password(password, &salt)
        .map(|hash| hash.to_string())
}

/// The credential after `scheme` (lower case, with its space; matched case-insensitively) in an
/// `Authorization` or `Proxy-Authorization` value.
pub(crate) fn credential<'a>(value: &'a HeaderValue, scheme: &[u8]) -> Option<&'a [u8]> {
    let value = value.as_bytes();
    let given = value.get(..scheme.len())?;
    if !given.eq_ignore_ascii_case(scheme) {
        return None;
    }
    let credential = value[scheme.len()..].trim_ascii();
    (!credential.is_empty()).then_some(credential)
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

    #[tokio::test]
    async fn only_one_bearer_header_with_a_configured_key_is_admitted() {
        let route = keys(&["sk-one", "sk-two"]);
        assert!(route.admit(&headers(&["Bearer sk-one"])).await);
        assert!(route.admit(&headers(&["bearer   sk-two  "])).await);
        assert!(!route.admit(&headers(&[])).await);
        assert!(!route.admit(&headers(&["Bearer sk-three"])).await);
        assert!(!route.admit(&headers(&["Bearer sk-on"])).await);
        assert!(!route.admit(&headers(&["Basic sk-one"])).await);
        assert!(!route.admit(&headers(&["Bearer "])).await);
        assert!(
            !route
                .admit(&headers(&["Bearer sk-one", "Bearer sk-one"]))
                .await
        );
    }

    #[tokio::test]
    async fn basic_passwords_are_checked_against_their_argon2_hash() {
        let hash = hash_password(b"correct horse").unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        let route = Keys::new(&RouteAuth {
            users: vec![("alice".into(), hash)],
            ..RouteAuth::default()
        });
        let basic = |pair: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair)
            )
        };
        assert!(
            route
                .admit(&headers(&[&basic("alice:correct horse")]))
                .await
        );
        // Remembered now: the second check costs no argon2 run.
        assert!(route.remembered().len() == 1);
        assert!(
            route
                .admit(&headers(&[&basic("alice:correct horse")]))
                .await
        );
        assert!(!route.admit(&headers(&[&basic("alice:wrong")])).await);
        assert!(!route.admit(&headers(&[&basic("bob:correct horse")])).await);
        assert!(!route.admit(&headers(&["Bearer correct horse"])).await);
        let challenges: Vec<_> = route.challenges().collect();
        assert_eq!(challenges.len(), 1);
        assert!(challenges[0].to_str().unwrap().starts_with("Basic"));
    }
}
