//! CSRF tokens of the login, consent and logout forms: HMAC-SHA-256 (under the service's
//! `page-key`) of what the form is for, the pending request's id and the browser's random
//! CSRF cookie. A token is therefore useless in another browser (it lacks the cookie),
//! for another pending request, or on another form; nothing about it is stored, and it is
//! checked in constant time.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sec_common::secret::KeyedHasher;

/// Which form a token is for: a login token cannot be replayed on the consent form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Login,
    Consent,
    Logout,
}

impl Purpose {
    fn label(self) -> &'static str {
        match self {
            Purpose::Login => "login",
            Purpose::Consent => "consent",
            Purpose::Logout => "logout",
        }
    }
}

fn message(purpose: Purpose, request_id: &str, browser: &str) -> String {
    // Neither id contains a NUL byte, so the encoding is unambiguous.
    format!("csrf\0{}\0{request_id}\0{browser}", purpose.label())
}

/// The token for `purpose`, pending request `request_id` and CSRF cookie `browser`.
pub fn token(key: &KeyedHasher, purpose: Purpose, request_id: &str, browser: &str) -> String {
    URL_SAFE_NO_PAD.encode(key.hash(&message(purpose, request_id, browser)))
}

/// Whether `presented` is the token for these values (constant time).
pub fn verify(
    key: &KeyedHasher,
    purpose: Purpose,
    request_id: &str,
    browser: &str,
    presented: &str,
) -> bool {
    let Ok(tag) = URL_SAFE_NO_PAD.decode(presented) else {
        return false;
    };
    tag.len() == 32 && key.verify(&message(purpose, request_id, browser), &tag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_bind_purpose_request_and_browser() {
        let key = KeyedHasher::new(&[3; 32]).unwrap();
        let t = token(&key, Purpose::Login, "req1", "browserA");
        assert!(verify(&key, Purpose::Login, "req1", "browserA", &t));
        assert!(!verify(&key, Purpose::Consent, "req1", "browserA", &t));
        assert!(!verify(&key, Purpose::Login, "req2", "browserA", &t));
        assert!(!verify(&key, Purpose::Login, "req1", "browserB", &t));
        // Shifting a separator does not produce the same message.
        assert!(!verify(&key, Purpose::Login, "req1\0browser", "A", &t));
        let other = KeyedHasher::new(&[4; 32]).unwrap();
        assert!(!verify(&other, Purpose::Login, "req1", "browserA", &t));
        assert!(!verify(&key, Purpose::Login, "req1", "browserA", ""));
        assert!(!verify(&key, Purpose::Login, "req1", "browserA", "!!not base64"));
        assert!(!verify(&key, Purpose::Login, "req1", "browserA", &t[..20]));
    }
}
