//! crypto-svc `Encrypt` then `Decrypt` of 1 KiB with associated data, under an
//! aes256-gcm key: the round trip a platform service makes to protect a record.

use sec_common::grpc::BearerToken;
use sec_proto::crypto::v1::crypto_service_client::CryptoServiceClient;
use sec_proto::crypto::v1::{CreateKeyRequest, DecryptRequest, EncryptRequest, KeyType};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::Scenario;
use crate::platform::Target;

const KEY: &str = "load-1k";

pub struct CryptoEncryptDecrypt;

impl Scenario for CryptoEncryptDecrypt {
    type Client = CryptoServiceClient<InterceptedService<Channel, BearerToken>>;
    const NAME: &'static str = "crypto_encrypt_decrypt_1k";
    const ABOUT: &'static str =
        "sec.crypto.v1 Encrypt + Decrypt of 1 KiB (aes256-gcm), one op = both calls";

    async fn setup(target: &Target) -> anyhow::Result<Self::Client> {
        let mut c = CryptoServiceClient::with_interceptor(
            target.channel("crypto")?,
            target.admin_bearer()?,
        );
        c.create_key(CreateKeyRequest {
            name: KEY.into(),
            r#type: KeyType::Aes256Gcm as i32,
            config: None,
        })
        .await?;
        Ok(c)
    }

    async fn call(c: &mut Self::Client) -> anyhow::Result<()> {
        let plaintext = vec![0x5A_u8; 1024];
        let ct = c
            .encrypt(EncryptRequest {
                key_name: KEY.into(),
                plaintext: plaintext.clone(),
                associated_data: b"row".to_vec(),
            })
            .await?
            .into_inner();
        let pt = c
            .decrypt(DecryptRequest {
                key_name: KEY.into(),
                ciphertext: ct.ciphertext,
                associated_data: b"row".to_vec(),
            })
            .await?
            .into_inner();
        anyhow::ensure!(pt.plaintext == plaintext, "round trip mismatch");
        Ok(())
    }
}
