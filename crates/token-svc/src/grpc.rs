//! `sec.token.v1.TokenService`: request validation, authorization and proto mapping
//! over the [`Engine`]. Who may call what is declared once in [`crate::ACCESS`] and
//! enforced by the host; IssueTokens / RefreshTokens also check `token.issuers` here.

use std::sync::Arc;

use prost::Message as _;
use sec_common::auth::Caller;
use sec_common::error::Error;
use sec_common::events::{from_timestamp, to_timestamp};
use sec_proto::token::v1 as pb;
use sec_proto::token::v1::token_service_server::TokenService;
use tonic::{Request, Response, Status};

use crate::engine::{
    self, ClientCounts, Engine, Grant, IssueRequest, IssueResult, KeyInfo, Reason, RefreshOutcome,
    RefreshRequest, RevokeTarget, TokenError, json_object, validate,
};
use crate::keys::Alg;
use crate::store::{KeyState, RevocationKind};

pub struct TokenApi {
    pub engine: Arc<Engine>,
}

fn grant_error(code: &str, message: &'static str) -> Status {
    let info = sec_proto::common::v1::ErrorInfo {
        code: code.to_owned(),
        field: String::new(),
    };
    Status::with_details(
        tonic::Code::InvalidArgument,
        message,
        info.encode_to_vec().into(),
    )
}

/// `invalid_grant` and `reuse_detected` are `INVALID_ARGUMENT` with that ErrorInfo code
/// (both become RFC 6749 `invalid_grant` at the facade).
fn status(e: TokenError) -> Status {
    match e {
        TokenError::Api(e) => e.into(),
        TokenError::InvalidGrant => grant_error("invalid_grant", "invalid refresh token"),
        TokenError::ReuseDetected => grant_error(
            "reuse_detected",
            "refresh token reuse detected; the token family is revoked",
        ),
    }
}

fn alg_to_proto(a: Alg) -> pb::Algorithm {
    match a {
        Alg::Es256 => pb::Algorithm::Es256,
        Alg::EdDsa => pb::Algorithm::Eddsa,
        Alg::Rs256 => pb::Algorithm::Rs256,
        Alg::Ps256 => pb::Algorithm::Ps256,
    }
}

fn state_to_proto(s: KeyState) -> pb::KeyState {
    match s {
        KeyState::Next => pb::KeyState::Next,
        KeyState::Current => pb::KeyState::Current,
        KeyState::Retiring => pb::KeyState::Retiring,
        KeyState::Retired => pb::KeyState::Retired,
        KeyState::Revoked => pb::KeyState::Revoked,
    }
}

pub fn reason_to_proto(r: Reason) -> pb::InvalidReason {
    pb::InvalidReason::try_from(r as i32).unwrap_or(pb::InvalidReason::Malformed)
}

fn key_to_proto(k: &KeyInfo) -> pb::SigningKey {
    pb::SigningKey {
        kid: k.kid.clone(),
        alg: alg_to_proto(k.alg) as i32,
        state: state_to_proto(k.state) as i32,
        created_at: Some(to_timestamp(k.created_at)),
        activated_at: k.activated_at.map(to_timestamp),
        deactivated_at: k.deactivated_at.map(to_timestamp),
        unpublish_at: k.unpublish_at.map(to_timestamp),
        revoked_at: k.revoked_at.map(to_timestamp),
        public_jwk_json: k.public_jwk.clone(),
    }
}

fn issued(r: IssueResult) -> pb::IssueTokensResponse {
    let tok = |t: engine::Issued| pb::IssuedToken {
        token: t.token,
        jti: t.jti,
        kid: t.kid,
        expires_at: Some(to_timestamp(t.expires_at)),
    };
    pb::IssueTokensResponse {
        access_token: Some(tok(r.access)),
        id_token: r.id.map(tok),
        refresh_token: r.refresh.map(|f| pb::IssuedRefreshToken {
            token: f.token,
            family_id: f.family_id,
            expires_at: Some(to_timestamp(f.expires_at)),
        }),
        scope: r.scope,
    }
}

fn counts_to_proto(client_id: String, c: &ClientCounts) -> pb::ClientTokenStats {
    pb::ClientTokenStats {
        client_id,
        issued: c.issued,
        refreshed: c.refreshed,
        validated: c.validated,
        rejected: c
            .rejected
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(i, n)| pb::ReasonCount {
                reason: i32::try_from(i).unwrap_or(0),
                count: *n,
            })
            .collect(),
        reuse_detected: c.reuse_detected,
        revoked: c.revoked,
    }
}

impl TokenApi {
    /// IssueTokens / RefreshTokens: the admin, or a service listed in `token.issuers`.
    fn check_issuer<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let who = Caller::of(req)?;
        if who.is_admin() {
            return Ok(());
        }
        match who.service_identity() {
            Some(id) if self.engine.config().issuers.iter().any(|i| i == id) => Ok(()),
            _ => Err(Error::denied("this service may not issue tokens (token.issuers)").into()),
        }
    }
}

#[tonic::async_trait]
impl TokenService for TokenApi {
    async fn get_jwks(
        &self,
        _: Request<pb::GetJwksRequest>,
    ) -> Result<Response<pb::GetJwksResponse>, Status> {
        let (jwks_json, max_age) = self.engine.jwks();
        Ok(Response::new(pb::GetJwksResponse {
            jwks_json,
            max_age_seconds: u32::try_from(max_age).unwrap_or(u32::MAX),
        }))
    }

    async fn issue_tokens(
        &self,
        req: Request<pb::IssueTokensRequest>,
    ) -> Result<Response<pb::IssueTokensResponse>, Status> {
        self.check_issuer(&req)?;
        let r = req.into_inner();
        let g = r
            .grant
            .ok_or_else(|| Status::from(Error::invalid("grant", "required")))?;
        let grant = Grant {
            extra_claims: json_object("grant.extra_claims_json", &g.extra_claims_json)
                .map_err(status)?,
            subject: g.subject,
            client_id: g.client_id,
            scope: g.scope,
            audience: g.audience,
            auth_time: g.auth_time,
            acr: g.acr,
            amr: g.amr,
            session_id: g.session_id,
        };
        let out = self
            .engine
            .issue(IssueRequest {
                grant,
                access_ttl_seconds: r.access_ttl_seconds,
                id_token: r.id_token,
                id_claims: json_object("id_claims_json", &r.id_claims_json).map_err(status)?,
                nonce: r.nonce,
                authorization_code: r.authorization_code,
                id_ttl_seconds: r.id_ttl_seconds,
                refresh_token: r.refresh_token,
                refresh_ttl_seconds: r.refresh_ttl_seconds,
            })
            .await
            .map_err(status)?;
        Ok(Response::new(issued(out)))
    }

    async fn refresh_tokens(
        &self,
        req: Request<pb::RefreshTokensRequest>,
    ) -> Result<Response<pb::RefreshTokensResponse>, Status> {
        self.check_issuer(&req)?;
        let r = req.into_inner();
        if r.client_id.is_empty() {
            return Err(Error::invalid("client_id", "required").into());
        }
        let (out, outcome) = self
            .engine
            .refresh(RefreshRequest {
                refresh_token: r.refresh_token,
                client_id: r.client_id,
                scope: r.scope,
                access_ttl_seconds: r.access_ttl_seconds,
                id_token: r.id_token,
                id_claims: json_object("id_claims_json", &r.id_claims_json).map_err(status)?,
            })
            .await
            .map_err(status)?;
        Ok(Response::new(pb::RefreshTokensResponse {
            tokens: Some(issued(out)),
            outcome: match outcome {
                RefreshOutcome::Rotated => pb::RefreshOutcome::Rotated,
                RefreshOutcome::GraceReissued => pb::RefreshOutcome::GraceReissued,
            } as i32,
        }))
    }

    async fn validate_token(
        &self,
        req: Request<pb::ValidateTokenRequest>,
    ) -> Result<Response<pb::ValidateTokenResponse>, Status> {
        let r = req.into_inner();
        if r.audience.len() > 255 {
            return Err(Error::invalid("audience", "longer than 255 bytes").into());
        }
        let kind = match pb::TokenKind::try_from(r.kind) {
            Ok(pb::TokenKind::Unspecified | pb::TokenKind::Access) => validate::Kind::Access,
            Ok(pb::TokenKind::Id) => {
                if r.audience.is_empty() {
                    return Err(Error::invalid(
                        "audience",
                        "required for ID tokens (the client id)",
                    )
                    .into());
                }
                validate::Kind::Id
            }
            Err(_) => return Err(Error::invalid("kind", "unknown token kind").into()),
        };
        let aud = (!r.audience.is_empty()).then_some(r.audience.as_str());
        let resp = match self.engine.validate(&r.token, kind, aud).await {
            Ok(v) => pb::ValidateTokenResponse {
                valid: true,
                reason: pb::InvalidReason::Unspecified as i32,
                claims_json: serde_json::Value::Object(v.claims).to_string(),
                subject: v.subject,
                client_id: v.client_id,
                scope: v.scope,
                jti: v.jti,
                expires_at: Some(to_timestamp(v.expires_at)),
                kid: v.kid,
            },
            Err(reason) => pb::ValidateTokenResponse {
                valid: false,
                reason: reason_to_proto(reason) as i32,
                ..Default::default()
            },
        };
        Ok(Response::new(resp))
    }

    async fn introspect_refresh_token(
        &self,
        req: Request<pb::IntrospectRefreshTokenRequest>,
    ) -> Result<Response<pb::IntrospectRefreshTokenResponse>, Status> {
        let r = req.into_inner();
        let resp = match self
            .engine
            .introspect_refresh(&r.refresh_token)
            .await
            .map_err(status)?
        {
            // RFC 7662: an inactive token reveals nothing else.
            Some((row, true)) => pb::IntrospectRefreshTokenResponse {
                active: true,
                subject: row.user_id,
                client_id: row.client_id,
                scope: row.scope,
                family_id: row.family_id,
                expires_at: Some(to_timestamp(row.expires_at)),
                issued_at: Some(to_timestamp(row.created_at)),
            },
            _ => pb::IntrospectRefreshTokenResponse::default(),
        };
        Ok(Response::new(resp))
    }

    async fn revoke_token(
        &self,
        req: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        use pb::revoke_token_request::Target as T;
        let r = req.into_inner();
        if r.reason.len() > 512 {
            return Err(Error::invalid("reason", "longer than 512 bytes").into());
        }
        let target = match r.target {
            Some(T::Jti(v)) => RevokeTarget::Jti(v),
            Some(T::RefreshToken(v)) => RevokeTarget::RefreshToken(v),
            Some(T::FamilyId(v)) => RevokeTarget::Family(v),
            Some(T::Subject(v)) => RevokeTarget::Subject(v),
            Some(T::ClientId(v)) => RevokeTarget::Client(v),
            Some(T::Token(v)) => RevokeTarget::Token(v),
            None => return Err(Error::invalid("target", "required").into()),
        };
        let expires_at = match &r.expires_at {
            Some(t) => Some(
                from_timestamp(t)
                    .ok_or_else(|| Status::from(Error::invalid("expires_at", "out of range")))?,
            ),
            None => None,
        };
        let revoked = self
            .engine
            .revoke(target, expires_at, &r.requesting_client_id)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::RevokeTokenResponse { revoked }))
    }

    async fn list_revocations(
        &self,
        req: Request<pb::ListRevocationsRequest>,
    ) -> Result<Response<pb::ListRevocationsResponse>, Status> {
        use pb::revocation::Target as T;
        let r = req.into_inner();
        if r.cursor.len() > 64 {
            return Err(Error::invalid("cursor", "not a cursor this service returned").into());
        }
        let (rows, cursor, snapshot, as_of) = self
            .engine
            .list_revocations(&r.cursor)
            .await
            .map_err(status)?;
        let revocations = rows
            .into_iter()
            .map(|row| pb::Revocation {
                target: Some(match row.kind {
                    RevocationKind::Jti => T::Jti(row.target),
                    RevocationKind::Subject => T::Subject(row.target),
                    RevocationKind::Client => T::ClientId(row.target),
                    RevocationKind::SigningKey => T::Kid(row.target),
                }),
                expires_at: Some(to_timestamp(row.expires_at)),
                not_before: row.not_before.map(to_timestamp),
            })
            .collect();
        Ok(Response::new(pb::ListRevocationsResponse {
            revocations,
            cursor,
            snapshot,
            as_of: Some(to_timestamp(as_of)),
        }))
    }

    async fn list_signing_keys(
        &self,
        req: Request<pb::ListSigningKeysRequest>,
    ) -> Result<Response<pb::ListSigningKeysResponse>, Status> {
        let keys = self
            .engine
            .list_keys(req.into_inner().include_inactive)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ListSigningKeysResponse {
            keys: keys.iter().map(key_to_proto).collect(),
        }))
    }

    async fn rotate_signing_key(
        &self,
        req: Request<pb::RotateSigningKeyRequest>,
    ) -> Result<Response<pb::RotateSigningKeyResponse>, Status> {
        let alg = match pb::Algorithm::try_from(req.into_inner().alg) {
            Ok(pb::Algorithm::Unspecified) => None,
            Ok(pb::Algorithm::Es256) => Some(Alg::Es256),
            Ok(pb::Algorithm::Eddsa) => Some(Alg::EdDsa),
            Ok(pb::Algorithm::Rs256) => Some(Alg::Rs256),
            Ok(pb::Algorithm::Ps256) => Some(Alg::Ps256),
            Err(_) => return Err(Error::invalid("alg", "unknown algorithm").into()),
        };
        let keys = self.engine.rotate_now(alg).await.map_err(status)?;
        let find = |s: KeyState| {
            keys.iter()
                .filter(|k| k.state == s)
                .max_by_key(|k| k.deactivated_at)
                .map(key_to_proto)
        };
        Ok(Response::new(pb::RotateSigningKeyResponse {
            current: find(KeyState::Current),
            next: find(KeyState::Next),
            retiring: find(KeyState::Retiring),
        }))
    }

    async fn revoke_signing_key(
        &self,
        req: Request<pb::RevokeSigningKeyRequest>,
    ) -> Result<Response<pb::SigningKey>, Status> {
        let r = req.into_inner();
        if r.kid.is_empty() {
            return Err(Error::invalid("kid", "required").into());
        }
        let k = self
            .engine
            .revoke_key(&r.kid, &r.reason)
            .await
            .map_err(status)?;
        Ok(Response::new(key_to_proto(&k)))
    }

    async fn token_stats(
        &self,
        req: Request<pb::TokenStatsRequest>,
    ) -> Result<Response<pb::TokenStatsResponse>, Status> {
        let r = req.into_inner();
        let s = self
            .engine
            .stats(r.window_seconds, &r.client_id)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::TokenStatsResponse {
            window_seconds: u32::try_from(s.window_seconds).unwrap_or(0),
            clients: s
                .clients
                .iter()
                .map(|(c, n)| counts_to_proto(c.clone(), n))
                .collect(),
            total: Some(counts_to_proto(String::new(), &s.total)),
            active_refresh_families: s.active_refresh_families,
            signing_key_rotations: s.total.rotations,
        }))
    }
}
