//! OAuth request parameters (query strings and `application/x-www-form-urlencoded`
//! bodies), parsed strictly: RFC 6749 §3.1 says parameters "MUST NOT be included more
//! than once" and that one "sent without a value MUST be treated as if it were omitted".
//! A duplicated, oversized or undecodable parameter is an `invalid_request` naming it.

use std::collections::BTreeMap;

use axum::http::{HeaderMap, header};

use super::error::OAuthError;

/// At most this many parameters in one request.
pub const MAX_PARAMS: usize = 64;
/// Parameter names longer than this are refused.
const MAX_NAME_BYTES: usize = 64;

/// The decoded parameters of one request, each present at most once and non-empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params(BTreeMap<String, String>);

impl Params {
    /// Parses a query string or form body. `max_value` bounds each decoded value.
    pub fn parse(raw: &[u8], max_value: usize) -> Result<Self, OAuthError> {
        let mut map = BTreeMap::new();
        // Every name seen, with or without a value: `a=&a=1` repeats `a` too.
        let mut seen = std::collections::BTreeSet::new();
        let mut count = 0_usize;
        for (name, value) in form_urlencoded::parse(raw) {
            count += 1;
            if count > MAX_PARAMS {
                return Err(OAuthError::invalid_request("too many parameters"));
            }
            if name.is_empty() || name.len() > MAX_NAME_BYTES {
                return Err(OAuthError::invalid_request("malformed parameter name"));
            }
            if value.len() > max_value {
                return Err(OAuthError::invalid_request(format!(
                    "parameter `{}` is longer than {max_value} bytes",
                    safe_name(&name)
                )));
            }
            if !seen.insert(name.to_string()) {
                return Err(duplicate(&name));
            }
            // Treated as omitted (RFC 6749 §3.1).
            if !value.is_empty() {
                map.insert(name.to_string(), value.into_owned());
            }
        }
        Ok(Self(map))
    }

    /// A POST body: the content type must be `application/x-www-form-urlencoded`.
    pub fn from_form(
        headers: &HeaderMap,
        body: &[u8],
        max_value: usize,
    ) -> Result<Self, OAuthError> {
        let form = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| {
                v.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            });
        if !form {
            return Err(OAuthError::invalid_request(
                "the body must be application/x-www-form-urlencoded",
            ));
        }
        if std::str::from_utf8(body).is_err() {
            return Err(OAuthError::invalid_request("the body is not UTF-8"));
        }
        Self::parse(body, max_value)
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// The parameter, or `invalid_request` naming it.
    pub fn require(&self, name: &str) -> Result<&str, OAuthError> {
        self.get(name)
            .ok_or_else(|| OAuthError::invalid_request(format!("missing parameter `{name}`")))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

fn duplicate(name: &str) -> OAuthError {
    OAuthError::invalid_request(format!(
        "parameter `{}` is included more than once",
        safe_name(name)
    ))
}

/// A caller's parameter name as it may appear in an error description: printable ASCII
/// only, bounded.
fn safe_name(name: &str) -> String {
    name.chars()
        .filter(|c| c.is_ascii_graphic() && *c != '"' && *c != '\\')
        .take(MAX_NAME_BYTES)
        .collect()
}

/// Space-delimited scope list (RFC 6749 §3.3): de-duplicated, in first-seen order.
/// `None` when a token is not a valid scope-token.
pub fn scope_list(raw: &str) -> Option<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for s in raw.split(' ') {
        if s.is_empty() {
            continue;
        }
        if !crate::config::valid_scope_name(s) {
            return None;
        }
        if !out.iter().any(|o| o == s) {
            out.push(s.to_owned());
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_treats_empty_as_omitted() {
        let p = Params::parse(b"a=1&b=&c=x%20y", 100).unwrap();
        assert_eq!(p.get("a"), Some("1"));
        assert_eq!(p.get("b"), None);
        assert_eq!(p.get("c"), Some("x y"));
        assert_eq!(p.require("b").unwrap_err().error, "invalid_request");
    }

    #[test]
    fn refuses_duplicates_oversized_and_too_many() {
        for raw in ["a=1&a=2", "a=&a=1", "a=1&a="] {
            let e = Params::parse(raw.as_bytes(), 100).unwrap_err();
            assert_eq!(e.error, "invalid_request", "{raw}");
            assert!(e.description.contains("`a`"), "{}", e.description);
        }
        let long = format!("a={}", "x".repeat(101));
        assert!(
            Params::parse(long.as_bytes(), 100)
                .unwrap_err()
                .description
                .contains("longer")
        );
        // The limit is on the decoded value: %41 is one byte.
        let encoded = format!("a={}", "%41".repeat(100));
        assert_eq!(
            Params::parse(encoded.as_bytes(), 100)
                .unwrap()
                .get("a")
                .unwrap()
                .len(),
            100
        );
        let many: Vec<String> = (0..=MAX_PARAMS).map(|i| format!("p{i}=1")).collect();
        assert!(Params::parse(many.join("&").as_bytes(), 100).is_err());
    }

    #[test]
    fn form_needs_its_content_type() {
        let mut h = HeaderMap::new();
        assert!(Params::from_form(&h, b"a=1", 100).is_err());
        h.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        assert!(Params::from_form(&h, b"a=1", 100).is_err());
        h.insert(
            header::CONTENT_TYPE,
            "application/x-www-form-urlencoded; charset=UTF-8"
                .parse()
                .unwrap(),
        );
        assert_eq!(
            Params::from_form(&h, b"a=1", 100).unwrap().get("a"),
            Some("1")
        );
    }

    #[test]
    fn scope_lists() {
        assert_eq!(
            scope_list("openid  profile openid").unwrap(),
            vec!["openid".to_owned(), "profile".to_owned()]
        );
        assert!(scope_list("bad\"scope").is_none());
        assert!(scope_list("").unwrap().is_empty());
    }
}
