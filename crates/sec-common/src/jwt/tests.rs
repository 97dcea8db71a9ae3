use std::sync::OnceLock;

use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use aws_lc_rs::signature::{
    self, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair,
};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use chrono::{DateTime, TimeZone, Utc};
use serde_json::{Map, Value, json};

use super::*;

const ISS: &str = "https://token.sec.test";
const AUD: &str = "api";

enum Signer {
    Ec(EcdsaKeyPair),
    Ed(Ed25519KeyPair),
    Rsa(&'static RsaKeyPair, Alg),
}

impl Signer {
    fn sign(&self, msg: &[u8]) -> Vec<u8> {
        let rng = SystemRandom::new();
        match self {
            Signer::Ec(k) => k.sign(&rng, msg).unwrap().as_ref().to_vec(),
            Signer::Ed(k) => k.sign(msg).as_ref().to_vec(),
            Signer::Rsa(k, alg) => {
                let enc: &'static dyn signature::RsaEncoding = match alg {
                    Alg::Rs256 => &signature::RSA_PKCS1_SHA256,
                    _ => &signature::RSA_PSS_SHA256,
                };
                let mut sig = vec![0u8; k.public_modulus_len()];
                k.sign(enc, &rng, msg, &mut sig).unwrap();
                sig
            }
        }
    }

    fn alg(&self) -> Alg {
        match self {
            Signer::Ec(_) => Alg::Es256,
            Signer::Ed(_) => Alg::EdDsa,
            Signer::Rsa(_, a) => *a,
        }
    }

    fn verifying_key(&self) -> VerifyingKey {
        match self {
            Signer::Ec(k) => VerifyingKey::es256_from_sec1(k.public_key().as_ref()).unwrap(),
            Signer::Ed(k) => VerifyingKey::ed25519(k.public_key().as_ref()).unwrap(),
            Signer::Rsa(k, a) => {
                VerifyingKey::rsa_from_pkcs1_der(*a, k.public_key().as_ref()).unwrap()
            }
        }
    }
}

fn rsa_pair() -> &'static RsaKeyPair {
    static K: OnceLock<RsaKeyPair> = OnceLock::new();
    K.get_or_init(|| RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap())
}

fn signer(alg: Alg) -> Signer {
    match alg {
        Alg::Es256 => Signer::Ec(EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap()),
        Alg::EdDsa => Signer::Ed(Ed25519KeyPair::generate().unwrap()),
        Alg::Rs256 | Alg::Ps256 => Signer::Rsa(rsa_pair(), alg),
    }
}

fn now() -> DateTime<Utc> {
    Utc.timestamp_opt(1_800_000_000, 0).unwrap()
}

fn claims() -> Map<String, Value> {
    let t = now().timestamp();
    json!({
        "iss": ISS, "sub": "user-1", "aud": AUD, "client_id": "web", "scope": "read write",
        "jti": "jti-1", "iat": t, "nbf": t, "exp": t + 300,
    })
    .as_object()
    .unwrap()
    .clone()
}

fn expect() -> Expectations {
    Expectations::new(ISS, AUD, TokenType::Access)
}

/// A key set holding `s` under `kid`, and a token signed by it.
fn setup(alg: Alg) -> (Signer, KeySet) {
    let s = signer(alg);
    let mut keys = KeySet::new();
    keys.insert("k1", s.verifying_key(), KeyState::Active);
    (s, keys)
}

fn token(s: &Signer, kid: &str, typ: TokenType, c: &Map<String, Value>) -> String {
    encode(s.alg(), kid, typ, c, |m| Ok::<_, ()>(s.sign(m))).unwrap()
}

/// A token with a hand-written header, signed by `s`.
fn raw_token(s: &Signer, header: &Value, c: &Map<String, Value>) -> String {
    let input = format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(Value::Object(c.clone()).to_string())
    );
    let sig = s.sign(input.as_bytes());
    format!("{input}.{}", B64.encode(sig))
}

fn check(tok: &str, keys: &KeySet) -> Result<VerifiedClaims, InvalidReason> {
    verify(tok, keys, &expect(), now())
}

#[test]
fn a_good_token_of_every_alg_verifies_and_returns_its_claims() {
    for alg in Alg::ALL {
        let (s, keys) = setup(alg);
        let v = check(&token(&s, "k1", TokenType::Access, &claims()), &keys)
            .unwrap_or_else(|e| panic!("{alg}: {e}"));
        assert_eq!(v.alg, alg);
        assert_eq!(&*v.kid, "k1");
        assert_eq!(v.sub(), "user-1");
        assert_eq!(v.client_id(), Some("web"));
        assert_eq!(v.scope(), Some("read write"));
        assert_eq!(v.jti(), Some("jti-1"));
        assert_eq!(v.exp, now().timestamp() + 300);
        assert_eq!(v.claims["aud"], AUD);
    }
}

#[test]
fn alg_names_round_trip_and_nothing_else_parses() {
    for alg in Alg::ALL {
        assert_eq!(Alg::from_jose(alg.as_jose()), Some(alg));
        assert_eq!(alg.to_string().parse::<Alg>(), Ok(alg));
    }
    for bad in [
        "none", "None", "HS256", "HS512", "es256", "ES384", "RS512", "Ed25519", "",
    ] {
        assert_eq!(Alg::from_jose(bad), None, "{bad}");
    }
    let names: std::collections::HashSet<_> =
        InvalidReason::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(names.len(), InvalidReason::ALL.len());
}

#[test]
fn malformed_and_truncated_tokens_are_malformed() {
    let (s, keys) = setup(Alg::Es256);
    let good = token(&s, "k1", TokenType::Access, &claims());
    let parts: Vec<&str> = good.split('.').collect();
    let cases = [
        String::new(),
        "abc".into(),
        "a.b".into(),
        format!("{}.{}", parts[0], parts[1]),
        format!("{}.{}.{}.x.y", parts[0], parts[1], parts[2]),
        format!("{}..{}", parts[0], parts[2]),
        format!(".{}.{}", parts[1], parts[2]),
        format!("{}!.{}.{}", parts[0], parts[1], parts[2]),
        format!("{}.{}.{}", B64.encode("not json"), parts[1], parts[2]),
        format!("{}.{}.{}", B64.encode("[1,2]"), parts[1], parts[2]),
        format!(
            "{}.{}.{}",
            B64.encode(r#"{"kid":"k1"}"#),
            parts[1],
            parts[2]
        ),
        format!("{}=.{}.{}", parts[0], parts[1], parts[2]),
        format!("{}.{}.{}!!", parts[0], parts[1], parts[2]),
    ];
    for c in &cases {
        assert_eq!(
            check(c, &keys).unwrap_err(),
            InvalidReason::Malformed,
            "{c}"
        );
    }
    // Cut anywhere inside the signature: still a three-part token, but the signature fails.
    for cut in [good.len() - 1, good.len() - 5, good.len() - 40] {
        let r = check(&good[..cut], &keys).unwrap_err();
        assert!(
            matches!(r, InvalidReason::BadSignature | InvalidReason::Malformed),
            "{cut}: {r}"
        );
    }
    // Cut inside the payload: no longer three segments.
    let cut = parts[0].len() + 10;
    assert_eq!(
        check(&good[..cut], &keys).unwrap_err(),
        InvalidReason::Malformed
    );
}

#[test]
fn oversized_tokens_are_refused_before_parsing() {
    let (s, keys) = setup(Alg::Es256);
    let mut c = claims();
    c.insert("pad".into(), "x".repeat(9000).into());
    let big = token(&s, "k1", TokenType::Access, &c);
    assert_eq!(check(&big, &keys).unwrap_err(), InvalidReason::Oversized);
    // Garbage of the same size is also Oversized, not Malformed: the size comes first.
    assert_eq!(
        check(&"!".repeat(9000), &keys).unwrap_err(),
        InvalidReason::Oversized
    );
    let mut e = expect();
    e.max_token_bytes = 20_000;
    assert!(verify(&big, &keys, &e, now()).is_ok());
}

#[test]
fn wrong_typ_iss_aud_are_refused() {
    let (s, keys) = setup(Alg::Es256);
    // An ID token (typ JWT) where an access token is expected, and the reverse.
    let id = token(&s, "k1", TokenType::Id, &claims());
    assert_eq!(check(&id, &keys).unwrap_err(), InvalidReason::WrongType);
    let at = token(&s, "k1", TokenType::Access, &claims());
    let mut e = expect();
    e.typ = TokenType::Id;
    assert_eq!(
        verify(&at, &keys, &e, now()).unwrap_err(),
        InvalidReason::WrongType
    );
    assert!(verify(&id, &keys, &e, now()).is_ok());
    // Missing typ: fine for an ID token, not for an access token.
    let untyped = raw_token(&s, &json!({"alg":"ES256","kid":"k1"}), &claims());
    assert!(verify(&untyped, &keys, &e, now()).is_ok());
    assert_eq!(
        check(&untyped, &keys).unwrap_err(),
        InvalidReason::WrongType
    );
    // RFC 8725 §3.11: case-insensitive, application/ prefix allowed.
    for typ in ["AT+JWT", "application/at+jwt", "Application/At+Jwt"] {
        let t = raw_token(&s, &json!({"alg":"ES256","kid":"k1","typ":typ}), &claims());
        assert!(check(&t, &keys).is_ok(), "{typ}");
    }
    for typ in ["jwt", "at+jwt2", "application/", "text/at+jwt"] {
        let t = raw_token(&s, &json!({"alg":"ES256","kid":"k1","typ":typ}), &claims());
        assert_eq!(
            check(&t, &keys).unwrap_err(),
            InvalidReason::WrongType,
            "{typ}"
        );
    }

    let mut c = claims();
    c.insert("iss".into(), "https://evil.test".into());
    assert_eq!(
        check(&token(&s, "k1", TokenType::Access, &c), &keys).unwrap_err(),
        InvalidReason::WrongIssuer
    );

    for aud in [json!("other"), json!(["a", "b"]), json!([])] {
        let mut c = claims();
        c.insert("aud".into(), aud.clone());
        assert_eq!(
            check(&token(&s, "k1", TokenType::Access, &c), &keys).unwrap_err(),
            InvalidReason::WrongAudience,
            "{aud}"
        );
    }
    let mut c = claims();
    c.insert("aud".into(), json!(["other", AUD]));
    assert!(check(&token(&s, "k1", TokenType::Access, &c), &keys).is_ok());
}

#[test]
fn missing_or_mistyped_claims_are_malformed() {
    let (s, keys) = setup(Alg::EdDsa);
    for name in ["iss", "sub", "aud", "exp", "iat", "client_id", "jti"] {
        let mut c = claims();
        c.remove(name);
        assert_eq!(
            check(&token(&s, "k1", TokenType::Access, &c), &keys).unwrap_err(),
            InvalidReason::Malformed,
            "{name}"
        );
    }
    for (name, v) in [
        ("exp", json!("soon")),
        ("iat", json!(null)),
        ("sub", json!(7)),
        ("scope", json!(["a"])),
        ("aud", json!([1])),
        ("nbf", json!({})),
    ] {
        let mut c = claims();
        c.insert(name.into(), v);
        assert_eq!(
            check(&token(&s, "k1", TokenType::Access, &c), &keys).unwrap_err(),
            InvalidReason::Malformed,
            "{name}"
        );
    }
    // A payload that is not a JSON object, correctly signed.
    let input = format!(
        "{}.{}",
        B64.encode(r#"{"alg":"EdDSA","kid":"k1","typ":"at+jwt"}"#),
        B64.encode("[1]")
    );
    let t = format!("{input}.{}", B64.encode(s.sign(input.as_bytes())));
    assert_eq!(check(&t, &keys).unwrap_err(), InvalidReason::Malformed);
}

#[test]
fn expiry_and_not_before_apply_with_skew() {
    let (s, keys) = setup(Alg::Es256);
    let t = token(&s, "k1", TokenType::Access, &claims());
    let at = |secs: i64| {
        verify(
            &t,
            &keys,
            &expect(),
            now() + chrono::Duration::seconds(secs),
        )
    };
    // exp = now + 300, skew 60: valid until now + 359, expired from now + 360.
    assert!(at(359).is_ok());
    assert_eq!(at(360).unwrap_err(), InvalidReason::Expired);
    assert_eq!(at(100_000).unwrap_err(), InvalidReason::Expired);
    // nbf = iat = now: valid from now - 60.
    assert!(at(-60).is_ok());
    assert_eq!(at(-61).unwrap_err(), InvalidReason::NotYetValid);

    let mut c = claims();
    c.insert("nbf".into(), json!(now().timestamp() + 120));
    let t = token(&s, "k1", TokenType::Access, &c);
    assert_eq!(check(&t, &keys).unwrap_err(), InvalidReason::NotYetValid);
    // iat in the future beyond the skew, no nbf.
    let mut c = claims();
    c.remove("nbf");
    c.insert("iat".into(), json!(now().timestamp() + 3600));
    let t = token(&s, "k1", TokenType::Access, &c);
    assert_eq!(check(&t, &keys).unwrap_err(), InvalidReason::NotYetValid);
    // Fractional NumericDate is accepted.
    let mut c = claims();
    c.insert("exp".into(), json!(now().timestamp() as f64 + 10.5));
    assert_eq!(
        check(&token(&s, "k1", TokenType::Access, &c), &keys)
            .unwrap()
            .exp,
        now().timestamp() + 10
    );
    let mut e = expect();
    e.skew = std::time::Duration::ZERO;
    let mut c = claims();
    c.insert("exp".into(), json!(now().timestamp()));
    assert_eq!(
        verify(&token(&s, "k1", TokenType::Access, &c), &keys, &e, now()).unwrap_err(),
        InvalidReason::Expired
    );
}

#[test]
fn alg_none_and_unknown_algs_are_unsupported() {
    let (s, keys) = setup(Alg::Es256);
    let body = B64.encode(Value::Object(claims()).to_string());
    for alg in [
        "none", "None", "NONE", "HS256", "ES384", "RS512", "Ed25519", "",
    ] {
        let h = B64.encode(json!({"alg": alg, "kid": "k1", "typ": "at+jwt"}).to_string());
        for sig in ["", "AAAA"] {
            assert_eq!(
                check(&format!("{h}.{body}.{sig}"), &keys).unwrap_err(),
                InvalidReason::UnsupportedAlg,
                "{alg}"
            );
        }
    }
    // alg must be a string.
    let h = B64.encode(r#"{"alg":null,"kid":"k1"}"#);
    assert_eq!(
        check(&format!("{h}.{body}.AAAA"), &keys).unwrap_err(),
        InvalidReason::Malformed
    );
    let _ = s;
}

#[test]
fn hs256_signed_with_the_public_key_as_secret_is_refused() {
    // The classic confusion attack: HMAC over the token keyed with the verifier's public key.
    for alg in [Alg::Es256, Alg::Rs256] {
        let (s, keys) = setup(alg);
        let public_jwk = s.verifying_key().to_jwk("k1").to_string();
        let public_raw: Vec<u8> = match &s {
            Signer::Ec(k) => k.public_key().as_ref().to_vec(),
            Signer::Rsa(k, _) => k.public_key().as_ref().to_vec(),
            Signer::Ed(k) => k.public_key().as_ref().to_vec(),
        };
        for secret in [public_jwk.as_bytes(), &public_raw[..]] {
            let input = format!(
                "{}.{}",
                B64.encode(r#"{"alg":"HS256","kid":"k1","typ":"at+jwt"}"#),
                B64.encode(Value::Object(claims()).to_string())
            );
            let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret);
            let tag = aws_lc_rs::hmac::sign(&key, input.as_bytes());
            let t = format!("{input}.{}", B64.encode(tag.as_ref()));
            assert_eq!(check(&t, &keys).unwrap_err(), InvalidReason::UnsupportedAlg);
        }
    }
}

#[test]
fn a_valid_signature_under_a_kid_of_another_alg_is_alg_mismatch() {
    // ES256 key registered under "k1"; an EdDSA key of the attacker's... and also our own
    // EdDSA key under "k2": a genuine EdDSA signature presented with kid k1 must fail.
    let ec = signer(Alg::Es256);
    let ed = signer(Alg::EdDsa);
    let rs = signer(Alg::Rs256);
    let ps = signer(Alg::Ps256);
    let mut keys = KeySet::new();
    keys.insert("ec", ec.verifying_key(), KeyState::Active);
    keys.insert("ed", ed.verifying_key(), KeyState::Active);
    keys.insert("rs", rs.verifying_key(), KeyState::Active);
    keys.insert("ps", ps.verifying_key(), KeyState::Active);
    assert_eq!(
        check(&token(&ed, "ec", TokenType::Access, &claims()), &keys).unwrap_err(),
        InvalidReason::AlgMismatch
    );
    assert_eq!(
        check(&token(&ec, "ed", TokenType::Access, &claims()), &keys).unwrap_err(),
        InvalidReason::AlgMismatch
    );
    // Same RSA key, PKCS#1 signature presented under the PSS key's kid and vice versa.
    assert_eq!(
        check(&token(&rs, "ps", TokenType::Access, &claims()), &keys).unwrap_err(),
        InvalidReason::AlgMismatch
    );
    assert_eq!(
        check(&token(&ps, "rs", TokenType::Access, &claims()), &keys).unwrap_err(),
        InvalidReason::AlgMismatch
    );
    // And a header that lies about alg (says ES256 on the RS key's kid).
    let t = raw_token(
        &rs,
        &json!({"alg":"ES256","kid":"rs","typ":"at+jwt"}),
        &claims(),
    );
    assert_eq!(check(&t, &keys).unwrap_err(), InvalidReason::AlgMismatch);
    for (s, kid) in [(&ec, "ec"), (&ed, "ed"), (&rs, "rs"), (&ps, "ps")] {
        assert!(
            check(&token(s, kid, TokenType::Access, &claims()), &keys).is_ok(),
            "{kid}"
        );
    }
}

#[test]
fn unknown_missing_retired_and_revoked_kids_are_refused() {
    let (s, mut keys) = setup(Alg::Es256);
    assert_eq!(
        check(&token(&s, "k9", TokenType::Access, &claims()), &keys).unwrap_err(),
        InvalidReason::UnknownKey
    );
    let no_kid = raw_token(&s, &json!({"alg":"ES256","typ":"at+jwt"}), &claims());
    assert_eq!(
        check(&no_kid, &keys).unwrap_err(),
        InvalidReason::UnknownKey
    );
    let t = token(&s, "k1", TokenType::Access, &claims());
    keys.set_state("k1", KeyState::Retired);
    assert_eq!(check(&t, &keys).unwrap_err(), InvalidReason::KeyRetired);
    keys.set_state("k1", KeyState::Revoked);
    assert_eq!(check(&t, &keys).unwrap_err(), InvalidReason::KeyRevoked);
    // Revocation is final.
    keys.set_state("k1", KeyState::Active);
    assert_eq!(check(&t, &keys).unwrap_err(), InvalidReason::KeyRevoked);
    // A tombstone for a key never held.
    keys.set_state("k7", KeyState::Revoked);
    assert_eq!(
        check(&token(&s, "k7", TokenType::Access, &claims()), &keys).unwrap_err(),
        InvalidReason::KeyRevoked
    );
}

#[test]
fn bad_signatures_are_refused() {
    for alg in Alg::ALL {
        let (s, keys) = setup(alg);
        let t = token(&s, "k1", TokenType::Access, &claims());
        let (input, sig) = t.rsplit_once('.').unwrap();
        let mut sig_bytes = B64.decode(sig).unwrap();
        sig_bytes[5] ^= 1;
        let flipped = format!("{input}.{}", B64.encode(&sig_bytes));
        assert_eq!(
            check(&flipped, &keys).unwrap_err(),
            InvalidReason::BadSignature,
            "{alg}"
        );
        // The signature of other claims.
        let mut c = claims();
        c.insert("sub".into(), "admin".into());
        let other = token(&s, "k1", TokenType::Access, &c);
        let spliced = format!("{input}.{}", other.rsplit_once('.').unwrap().1);
        assert_eq!(
            check(&spliced, &keys).unwrap_err(),
            InvalidReason::BadSignature,
            "{alg}"
        );
        // A different key with the same kid and alg.
        let (s2, _) = setup(alg);
        if !matches!(alg, Alg::Rs256 | Alg::Ps256) {
            assert_eq!(
                check(&token(&s2, "k1", TokenType::Access, &claims()), &keys).unwrap_err(),
                InvalidReason::BadSignature
            );
        }
        // Empty and DER-looking ECDSA signatures.
        assert_eq!(
            check(&format!("{input}."), &keys).unwrap_err(),
            InvalidReason::BadSignature
        );
        assert_eq!(
            check(&format!("{input}.{}", B64.encode([0u8; 2000])), &keys).unwrap_err(),
            InvalidReason::BadSignature
        );
    }
}

#[test]
fn headers_that_point_at_other_keys_are_refused() {
    let (s, keys) = setup(Alg::Es256);
    for member in ["crit", "jku", "x5u", "jwk", "x5c"] {
        let mut h = json!({"alg":"ES256","kid":"k1","typ":"at+jwt"});
        h[member] = json!(null);
        assert_eq!(
            check(&raw_token(&s, &h, &claims()), &keys).unwrap_err(),
            InvalidReason::Malformed,
            "{member}"
        );
    }
    // Duplicate header members are refused (no "first vs last" ambiguity).
    let input = format!(
        "{}.{}",
        B64.encode(r#"{"alg":"ES256","kid":"k9","kid":"k1","typ":"at+jwt"}"#),
        B64.encode(Value::Object(claims()).to_string())
    );
    let t = format!("{input}.{}", B64.encode(s.sign(input.as_bytes())));
    assert_eq!(check(&t, &keys).unwrap_err(), InvalidReason::Malformed);
    // Unknown harmless members are ignored; escaped strings still parse.
    let t = raw_token(
        &s,
        &json!({"alg":"ES256","kid":"k\u{31}","typ":"at+jwt","cty":"x"}),
        &claims(),
    );
    assert!(check(&t, &keys).is_ok());
    let input = format!(
        "{}.{}",
        B64.encode(r#"{"alg":"ES\u0032\u00356","kid":"k1","typ":"at+jwt"}"#),
        B64.encode(Value::Object(claims()).to_string())
    );
    let t = format!("{input}.{}", B64.encode(s.sign(input.as_bytes())));
    assert!(check(&t, &keys).is_ok());
}

#[test]
fn jwks_round_trips_and_refuses_bad_keys() {
    let ec = signer(Alg::Es256);
    let ed = signer(Alg::EdDsa);
    let rs = signer(Alg::Rs256);
    let mut set = KeySet::new();
    set.insert("ec", ec.verifying_key(), KeyState::Active);
    set.insert("ed", ed.verifying_key(), KeyState::Active);
    set.insert("rs", rs.verifying_key(), KeyState::Active);
    set.insert("old", ec.verifying_key(), KeyState::Retired);
    let doc = set.to_jwks();
    assert_eq!(
        doc["keys"].as_array().unwrap().len(),
        3,
        "only active keys are published"
    );
    let parsed = KeySet::from_jwks_json(&doc.to_string()).unwrap();
    assert_eq!(parsed.len(), 3);
    for (s, kid) in [(&ec, "ec"), (&ed, "ed"), (&rs, "rs")] {
        assert!(
            check(&token(s, kid, TokenType::Access, &claims()), &parsed).is_ok(),
            "{kid}"
        );
        assert_eq!(parsed.get(kid).unwrap().0.alg(), s.alg());
    }

    let good_ec = ec.verifying_key().to_jwk("x");
    let with = |f: &dyn Fn(&mut Value)| {
        let mut k = good_ec.clone();
        f(&mut k);
        json!({ "keys": [k] }).to_string()
    };
    let bad: Vec<(&str, String)> = vec![
        (
            "no alg",
            with(&|k| {
                k.as_object_mut().unwrap().remove("alg");
            }),
        ),
        ("alg none", with(&|k| k["alg"] = "none".into())),
        ("alg HS256", with(&|k| k["alg"] = "HS256".into())),
        ("alg of another kty", with(&|k| k["alg"] = "EdDSA".into())),
        ("wrong crv", with(&|k| k["crv"] = "P-384".into())),
        ("enc use", with(&|k| k["use"] = "enc".into())),
        ("private d", with(&|k| k["d"] = "AAAA".into())),
        (
            "no kid",
            with(&|k| {
                k.as_object_mut().unwrap().remove("kid");
            }),
        ),
        ("empty kid", with(&|k| k["kid"] = "".into())),
        ("bad x", with(&|k| k["x"] = "!!".into())),
        (
            "off-curve",
            with(&|k| k["y"] = B64.encode([7u8; 32]).into()),
        ),
        ("key_ops sign", with(&|k| k["key_ops"] = json!(["sign"]))),
        ("not an object", json!({"keys": [1]}).to_string()),
        ("no keys", json!({"kees": []}).to_string()),
        (
            "duplicate kid",
            json!({"keys": [good_ec.clone(), good_ec.clone()]}).to_string(),
        ),
        ("not json", "{".into()),
    ];
    for (what, doc) in bad {
        assert!(KeySet::from_jwks_json(&doc).is_err(), "{what}");
    }
    // RSA below 2048 bits.
    let small = json!({"keys":[{"kty":"RSA","alg":"RS256","kid":"s","n":B64.encode([0xC5u8; 128]),"e":"AQAB"}]});
    assert!(KeySet::from_jwks_json(&small.to_string()).is_err());
    assert!(KeySet::from_jwks_json(&"x".repeat(MAX_JWKS_BYTES + 1)).is_err());
    let many = json!({"keys": (0..=MAX_JWKS_KEYS).map(|_| good_ec.clone()).collect::<Vec<_>>()});
    assert_eq!(
        KeySet::from_jwks_json(&many.to_string()).unwrap_err(),
        KeyError::TooManyKeys
    );
}

#[test]
fn decode_unverified_shows_header_and_claims() {
    let (s, _) = setup(Alg::Es256);
    let t = token(&s, "k1", TokenType::Access, &claims());
    let (h, c) = decode_unverified(&t, DEFAULT_MAX_TOKEN_BYTES).unwrap();
    assert_eq!(h["alg"], "ES256");
    assert_eq!(h["typ"], "at+jwt");
    assert_eq!(c["sub"], "user-1");
    assert_eq!(
        decode_unverified("a.b", 100).unwrap_err(),
        InvalidReason::Malformed
    );
    assert_eq!(
        decode_unverified(&t, 10).unwrap_err(),
        InvalidReason::Oversized
    );
}

#[test]
fn random_mutations_never_panic_and_never_verify() {
    let rng = SystemRandom::new();
    let rand_u32 = || {
        let mut b = [0u8; 4];
        rng.fill(&mut b).unwrap();
        u32::from_le_bytes(b)
    };
    for alg in [Alg::Es256, Alg::EdDsa, Alg::Rs256] {
        let (s, keys) = setup(alg);
        let good = token(&s, "k1", TokenType::Access, &claims());
        assert!(check(&good, &keys).is_ok());
        for _ in 0..2000 {
            let mut bytes = good.clone().into_bytes();
            for _ in 0..=(rand_u32() % 4) {
                let i = rand_u32() as usize % bytes.len();
                match rand_u32() % 4 {
                    0 => bytes[i] = (rand_u32() % 256) as u8,
                    1 => bytes[i] = b"._-=A/+\0{"[rand_u32() as usize % 9],
                    2 => {
                        bytes.truncate(i);
                    }
                    _ => {
                        let j = rand_u32() as usize % bytes.len().max(1);
                        bytes.insert(j.min(bytes.len()), b'.');
                    }
                }
                if bytes.is_empty() {
                    break;
                }
            }
            let Ok(mutated) = String::from_utf8(bytes) else {
                continue;
            };
            if mutated == good {
                continue;
            }
            // Base64 has no unused-bit slack here (strict decoding), so any change either
            // fails to decode or changes signed bytes: nothing mutated may verify.
            assert!(check(&mutated, &keys).is_err(), "{mutated}");
        }
    }
}
