//! `sec.crypto.v1.CryptoService`: request validation, authorization and proto mapping
//! over the [`Engine`]. Who may call what is declared once in [`crate::ACCESS`] and
//! enforced by the host before a handler runs; handlers only read the [`Caller`].

use std::sync::Arc;

use sec_common::auth::Caller;
use sec_common::error::Error;
use sec_common::events::to_timestamp;
use sec_proto::common::v1::PageResponse;
use sec_proto::crypto::v1 as pb;
use sec_proto::crypto::v1::crypto_service_server::CryptoService;
use tonic::{Request, Response, Status};

use crate::engine::{Engine, KeyView, Limits, PolicyUpdate};
use crate::material::{KeyType, public_pem};
use crate::store::KeyPolicy;

pub struct CryptoApi {
    pub engine: Arc<Engine>,
}

pub fn key_type_from_proto(t: i32) -> Result<KeyType, Error> {
    use pb::KeyType as P;
    Ok(match P::try_from(t).unwrap_or(P::Unspecified) {
        P::Aes256Gcm => KeyType::Aes256Gcm,
        P::Chacha20Poly1305 => KeyType::Chacha20Poly1305,
        P::Aes256GcmSiv => KeyType::Aes256GcmSiv,
        P::Rsa3072 => KeyType::Rsa3072,
        P::Rsa4096 => KeyType::Rsa4096,
        P::EcdsaP256 => KeyType::EcdsaP256,
        P::EcdsaP384 => KeyType::EcdsaP384,
        P::Ed25519 => KeyType::Ed25519,
        P::HmacSha256 => KeyType::HmacSha256,
        P::Rsa3072Wrapping => KeyType::Rsa3072Wrapping,
        P::Rsa4096Wrapping => KeyType::Rsa4096Wrapping,
        P::Unspecified => return Err(Error::invalid("type", "key type is required")),
    })
}

pub fn key_type_to_proto(t: KeyType) -> pb::KeyType {
    use pb::KeyType as P;
    match t {
        KeyType::Aes256Gcm => P::Aes256Gcm,
        KeyType::Chacha20Poly1305 => P::Chacha20Poly1305,
        KeyType::Aes256GcmSiv => P::Aes256GcmSiv,
        KeyType::Rsa3072 => P::Rsa3072,
        KeyType::Rsa4096 => P::Rsa4096,
        KeyType::EcdsaP256 => P::EcdsaP256,
        KeyType::EcdsaP384 => P::EcdsaP384,
        KeyType::Ed25519 => P::Ed25519,
        KeyType::HmacSha256 => P::HmacSha256,
        KeyType::Rsa3072Wrapping => P::Rsa3072Wrapping,
        KeyType::Rsa4096Wrapping => P::Rsa4096Wrapping,
    }
}

pub fn key_to_proto(k: KeyView) -> pb::Key {
    let p = &k.record.policy;
    pb::Key {
        name: k.record.name.clone(),
        r#type: key_type_to_proto(k.key_type) as i32,
        type_name: k.key_type.name().into(),
        latest_version: k.record.latest_version,
        config: Some(pb::KeyConfig {
            min_decryption_version: p.min_decryption_version,
            min_encryption_version: p.min_encryption_version,
            rotation_period_seconds: p.rotation_period_seconds,
            deletion_allowed: p.deletion_allowed,
            exportable: p.exportable,
            allowed_services: p.allowed_services.clone(),
        }),
        versions: k
            .versions
            .iter()
            .map(|(v, at, der, encryptions)| pb::KeyVersion {
                version: *v,
                created_at: Some(to_timestamp(*at)),
                public_key_pem: der.as_deref().map(public_pem).unwrap_or_default(),
                encryptions: *encryptions,
            })
            .collect(),
        created_at: Some(to_timestamp(k.record.created_at)),
        updated_at: Some(to_timestamp(k.record.updated_at)),
        last_rotated_at: Some(to_timestamp(k.record.last_rotated_at)),
        integrity_failed: k.integrity_failed,
        operations: k
            .key_type
            .operations()
            .iter()
            .map(|o| o.as_str().to_owned())
            .collect(),
        policy_version: k.record.policy_version,
    }
}

/// Per-key service access ([`Engine::authorize`]), before the operation runs.
async fn authorize<T>(engine: &Engine, req: &Request<T>, key_name: &str) -> Result<(), Status> {
    let who = Caller::of(req)?;
    engine.authorize(&who, key_name).await?;
    Ok(())
}

fn batch_error(e: Error) -> pb::BatchResultError {
    pb::BatchResultError {
        code: e.code.as_str().into(),
        message: e.message.into_owned(),
    }
}

/// What every batch request must pass before any item is looked at: a valid key name
/// (checked once, not per item) and at most `crypto.max_batch_items` items.
fn check_batch(engine: &Engine, key_name: &str, items: usize) -> Result<(), Error> {
    engine.check_batch(items)?;
    crate::engine::validate_name(key_name, "key_name")
}

#[tonic::async_trait]
impl CryptoService for CryptoApi {
    async fn create_key(
        &self,
        req: Request<pb::CreateKeyRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        let who = Caller::of(&req)?;
        let r = req.into_inner();
        let t = key_type_from_proto(r.r#type)?;
        let c = r.config.unwrap_or_default();
        let policy = KeyPolicy {
            min_decryption_version: c.min_decryption_version,
            min_encryption_version: c.min_encryption_version,
            rotation_period_seconds: c.rotation_period_seconds,
            deletion_allowed: c.deletion_allowed,
            exportable: c.exportable,
            allowed_services: c.allowed_services,
        };
        crate::engine::check_rotation_period(
            "config.rotation_period_seconds",
            policy.rotation_period_seconds,
        )?;
        Ok(Response::new(key_to_proto(
            self.engine.create_key(&who, &r.name, t, policy).await?,
        )))
    }

    async fn ensure_service_key(
        &self,
        req: Request<pb::EnsureServiceKeyRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        let who = Caller::of(&req)?;
        let r = req.into_inner();
        // Unspecified: the sealing key every service had before the field existed.
        let key_type = if r.r#type == pb::KeyType::Unspecified as i32 {
            KeyType::Aes256Gcm
        } else {
            key_type_from_proto(r.r#type)?
        };
        Ok(Response::new(key_to_proto(
            self.engine
                .ensure_service_key_of(&who, &r.purpose, key_type)
                .await?,
        )))
    }

    async fn get_key(&self, req: Request<pb::GetKeyRequest>) -> Result<Response<pb::Key>, Status> {
        Ok(Response::new(key_to_proto(
            self.engine.get_key(&req.into_inner().name).await?,
        )))
    }

    async fn list_keys(
        &self,
        req: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        let page = req.into_inner().page.unwrap_or_default();
        let after = (!page.page_token.is_empty()).then_some(page.page_token.as_str());
        if let Some(a) = after {
            crate::engine::validate_name(a, "page.page_token")?;
        }
        let size = if page.page_size == 0 {
            50
        } else {
            page.page_size
        };
        let (keys, next) = self.engine.list_keys(after, size).await?;
        Ok(Response::new(pb::ListKeysResponse {
            keys: keys.into_iter().map(key_to_proto).collect(),
            page: Some(PageResponse {
                next_page_token: next.unwrap_or_default(),
            }),
        }))
    }

    async fn rotate_key(
        &self,
        req: Request<pb::RotateKeyRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        let who = Caller::of(&req)?;
        Ok(Response::new(key_to_proto(
            self.engine.rotate_key(&who, &req.into_inner().name).await?,
        )))
    }

    async fn update_key_config(
        &self,
        req: Request<pb::UpdateKeyConfigRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        let who = Caller::of(&req)?;
        let r = req.into_inner();
        let u = PolicyUpdate {
            min_decryption_version: r.min_decryption_version,
            min_encryption_version: r.min_encryption_version,
            rotation_period_seconds: r.rotation_period_seconds,
            deletion_allowed: r.deletion_allowed,
            exportable: r.exportable,
            allowed_services: r.allowed_services.map(|l| l.services),
            expected_policy_version: r.expected_policy_version,
        };
        Ok(Response::new(key_to_proto(
            self.engine.update_policy(&who, &r.name, u).await?,
        )))
    }

    async fn delete_key(
        &self,
        req: Request<pb::DeleteKeyRequest>,
    ) -> Result<Response<pb::DeleteKeyResponse>, Status> {
        let who = Caller::of(&req)?;
        self.engine.delete_key(&who, &req.into_inner().name).await?;
        Ok(Response::new(pb::DeleteKeyResponse {}))
    }

    async fn backup_key(
        &self,
        req: Request<pb::BackupKeyRequest>,
    ) -> Result<Response<pb::BackupKeyResponse>, Status> {
        let who = Caller::of(&req)?;
        let r = req.into_inner();
        let backup = self
            .engine
            .backup_key(&who, &r.name, &r.wrapping_public_key_pem)
            .await?;
        let (source_public_key_pem, _) = self.engine.installation_public_key().await?;
        Ok(Response::new(pb::BackupKeyResponse {
            backup,
            source_public_key_pem,
        }))
    }

    async fn get_installation_key(
        &self,
        _req: Request<pb::GetInstallationKeyRequest>,
    ) -> Result<Response<pb::GetInstallationKeyResponse>, Status> {
        let (public_key_pem, fingerprint) = self.engine.installation_public_key().await?;
        Ok(Response::new(pb::GetInstallationKeyResponse {
            public_key_pem,
            fingerprint,
        }))
    }

    async fn restore_key(
        &self,
        req: Request<pb::RestoreKeyRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        let who = Caller::of(&req)?;
        let r = req.into_inner();
        let new_name = (!r.new_name.is_empty()).then_some(r.new_name.as_str());
        Ok(Response::new(key_to_proto(
            self.engine
                .restore_key(
                    &who,
                    &r.backup,
                    &r.wrapping_key_name,
                    new_name,
                    &r.source_public_key_pem,
                )
                .await?,
        )))
    }

    async fn rotate_kek(
        &self,
        req: Request<pb::RotateKekRequest>,
    ) -> Result<Response<pb::RotateKekResponse>, Status> {
        let who = Caller::of(&req)?;
        let (rewrapped, already_current) = self.engine.rotate_kek(&who).await?;
        Ok(Response::new(pb::RotateKekResponse {
            rewrapped,
            already_current,
            current_kek_id: self.engine.kek_id().into(),
        }))
    }

    async fn encrypt(
        &self,
        req: Request<pb::EncryptRequest>,
    ) -> Result<Response<pb::EncryptResponse>, Status> {
        authorize(&self.engine, &req, &req.get_ref().key_name).await?;
        let r = req.into_inner();
        let (ciphertext, key_version) = self
            .engine
            .encrypt(&r.key_name, &r.plaintext, &r.associated_data)
            .await?;
        Ok(Response::new(pb::EncryptResponse {
            ciphertext,
            key_version,
        }))
    }

    async fn decrypt(
        &self,
        req: Request<pb::DecryptRequest>,
    ) -> Result<Response<pb::DecryptResponse>, Status> {
        authorize(&self.engine, &req, &req.get_ref().key_name).await?;
        let who = Caller::of(&req)?;
        let r = req.into_inner();
        let (pt, key_version) = self
            .engine
            .decrypt(&who, &r.key_name, &r.ciphertext, &r.associated_data)
            .await?;
        Ok(Response::new(pb::DecryptResponse {
            plaintext: pt.to_vec(),
            key_version,
        }))
    }

    async fn batch_encrypt(
        &self,
        req: Request<pb::BatchEncryptRequest>,
    ) -> Result<Response<pb::BatchEncryptResponse>, Status> {
        let who = Caller::of(&req)?;
        let r = req.into_inner();
        check_batch(&self.engine, &r.key_name, r.items.len())?;
        self.engine.authorize(&who, &r.key_name).await?;
        let total: usize = r
            .items
            .iter()
            .map(|i| i.plaintext.len() + i.associated_data.len())
            .sum();
        let limits = self.engine.limits();
        if total > limits.max_payload_bytes {
            return Err(Error::invalid("items", "batch exceeds the payload limit").into());
        }
        // The response must never fail at encoding after the work is done: refuse up
        // front when its worst case could exceed what the server sends. With the
        // server's limit set from `max_message_bytes` this holds for every batch within
        // the item and payload limits; the check keeps it true if they ever diverge.
        if Limits::batch_encrypt_response_bound(r.items.len(), total) > limits.max_message_bytes() {
            return Err(
                Error::invalid("items", "batch response would exceed the message limit").into(),
            );
        }
        let mut results = Vec::with_capacity(r.items.len());
        for item in r.items {
            results.push(pb::BatchEncryptResult {
                result: Some(
                    match self
                        .engine
                        .encrypt(&r.key_name, &item.plaintext, &item.associated_data)
                        .await
                    {
                        Ok((ciphertext, key_version)) => {
                            pb::batch_encrypt_result::Result::Ok(pb::EncryptResponse {
                                ciphertext,
                                key_version,
                            })
                        }
                        Err(e) => pb::batch_encrypt_result::Result::Error(batch_error(e)),
                    },
                ),
            });
        }
        Ok(Response::new(pb::BatchEncryptResponse { results }))
    }

    async fn batch_decrypt(
        &self,
        req: Request<pb::BatchDecryptRequest>,
    ) -> Result<Response<pb::BatchDecryptResponse>, Status> {
        let who = Caller::of(&req)?;
        let r = req.into_inner();
        check_batch(&self.engine, &r.key_name, r.items.len())?;
        self.engine.authorize(&who, &r.key_name).await?;
        // The payload limit applies to what the texts decode to: the ciphertexts of a
        // batch of plaintexts at the limit (as BatchEncrypt accepts) pass, and each item's
        // decoded size is checked again in `Engine::decrypt`.
        let limits = self.engine.limits();
        let text: usize = r.items.iter().map(|i| i.ciphertext.len()).sum();
        let aad: usize = r.items.iter().map(|i| i.associated_data.len()).sum();
        if text > Limits::batch_ciphertext_text_bound(r.items.len(), limits.max_payload_bytes)
            || aad > limits.max_payload_bytes
        {
            return Err(Error::invalid("items", "batch exceeds the payload limit").into());
        }
        let mut results = Vec::with_capacity(r.items.len());
        for item in r.items {
            results.push(pb::BatchDecryptResult {
                result: Some(
                    match self
                        .engine
                        .decrypt(&who, &r.key_name, &item.ciphertext, &item.associated_data)
                        .await
                    {
                        Ok((pt, key_version)) => {
                            pb::batch_decrypt_result::Result::Ok(pb::DecryptResponse {
                                plaintext: pt.to_vec(),
                                key_version,
                            })
                        }
                        Err(e) => pb::batch_decrypt_result::Result::Error(batch_error(e)),
                    },
                ),
            });
        }
        Ok(Response::new(pb::BatchDecryptResponse { results }))
    }

    async fn rewrap(
        &self,
        req: Request<pb::RewrapRequest>,
    ) -> Result<Response<pb::RewrapResponse>, Status> {
        authorize(&self.engine, &req, &req.get_ref().key_name).await?;
        let who = Caller::of(&req)?;
        let r = req.into_inner();
        let (ciphertext, key_version) = self
            .engine
            .rewrap(&who, &r.key_name, &r.ciphertext, &r.associated_data)
            .await?;
        Ok(Response::new(pb::RewrapResponse {
            ciphertext,
            key_version,
        }))
    }

    async fn generate_data_key(
        &self,
        req: Request<pb::GenerateDataKeyRequest>,
    ) -> Result<Response<pb::GenerateDataKeyResponse>, Status> {
        authorize(&self.engine, &req, &req.get_ref().key_name).await?;
        let r = req.into_inner();
        let (pt, ciphertext, key_version) = self
            .engine
            .generate_data_key(&r.key_name, r.bytes, &r.associated_data)
            .await?;
        let plaintext = if r.wrapped_only {
            Vec::new()
        } else {
            pt.to_vec()
        };
        Ok(Response::new(pb::GenerateDataKeyResponse {
            plaintext,
            ciphertext,
            key_version,
        }))
    }

    async fn sign(
        &self,
        req: Request<pb::SignRequest>,
    ) -> Result<Response<pb::SignResponse>, Status> {
        authorize(&self.engine, &req, &req.get_ref().key_name).await?;
        let r = req.into_inner();
        let (signature, key_version) = self.engine.sign(&r.key_name, &r.message).await?;
        Ok(Response::new(pb::SignResponse {
            signature,
            key_version,
        }))
    }

    async fn verify(
        &self,
        req: Request<pb::VerifyRequest>,
    ) -> Result<Response<pb::VerifyResponse>, Status> {
        authorize(&self.engine, &req, &req.get_ref().key_name).await?;
        let r = req.into_inner();
        let valid = self
            .engine
            .verify(&r.key_name, &r.message, &r.signature)
            .await?;
        Ok(Response::new(pb::VerifyResponse { valid }))
    }

    async fn hmac(
        &self,
        req: Request<pb::HmacRequest>,
    ) -> Result<Response<pb::HmacResponse>, Status> {
        authorize(&self.engine, &req, &req.get_ref().key_name).await?;
        let r = req.into_inner();
        let (hmac, key_version) = self.engine.hmac(&r.key_name, &r.message).await?;
        Ok(Response::new(pb::HmacResponse { hmac, key_version }))
    }

    async fn batch_hmac(
        &self,
        req: Request<pb::BatchHmacRequest>,
    ) -> Result<Response<pb::BatchHmacResponse>, Status> {
        check_batch(
            &self.engine,
            &req.get_ref().key_name,
            req.get_ref().messages.len(),
        )?;
        authorize(&self.engine, &req, &req.get_ref().key_name).await?;
        let r = req.into_inner();
        let (hmacs, key_version) = self
            .engine
            .batch_hmac(&r.key_name, r.key_version, &r.messages)
            .await?;
        Ok(Response::new(pb::BatchHmacResponse { hmacs, key_version }))
    }

    async fn verify_hmac(
        &self,
        req: Request<pb::VerifyHmacRequest>,
    ) -> Result<Response<pb::VerifyResponse>, Status> {
        authorize(&self.engine, &req, &req.get_ref().key_name).await?;
        let r = req.into_inner();
        let valid = self
            .engine
            .verify_hmac(&r.key_name, &r.message, &r.hmac)
            .await?;
        Ok(Response::new(pb::VerifyResponse { valid }))
    }

    async fn get_public_key(
        &self,
        req: Request<pb::GetPublicKeyRequest>,
    ) -> Result<Response<pb::GetPublicKeyResponse>, Status> {
        authorize(&self.engine, &req, &req.get_ref().key_name).await?;
        let r = req.into_inner();
        let (public_key_pem, version, t) = self.engine.public_key(&r.key_name, r.version).await?;
        Ok(Response::new(pb::GetPublicKeyResponse {
            public_key_pem,
            version,
            r#type: key_type_to_proto(t) as i32,
        }))
    }
}
