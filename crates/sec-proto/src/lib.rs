//! Generated gRPC/protobuf code for the platform. Nothing hand-written lives here.
#![allow(clippy::all, clippy::pedantic, missing_docs, unreachable_pub)]

/// Serialized `FileDescriptorSet` of every package, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("sec_descriptor");

pub mod common {
    pub mod v1 {
        tonic::include_proto!("sec.common.v1");
    }
}
pub mod auth {
    pub mod v1 {
        tonic::include_proto!("sec.auth.v1");
    }
}
pub mod token {
    pub mod v1 {
        tonic::include_proto!("sec.token.v1");
    }
}
pub mod session {
    pub mod v1 {
        tonic::include_proto!("sec.session.v1");
    }
}
pub mod audit {
    pub mod v1 {
        tonic::include_proto!("sec.audit.v1");
    }
}
pub mod crypto {
    pub mod v1 {
        tonic::include_proto!("sec.crypto.v1");
    }
}
pub mod gdpr {
    pub mod v1 {
        tonic::include_proto!("sec.gdpr.v1");
    }
}
pub mod assess {
    pub mod v1 {
        tonic::include_proto!("sec.assess.v1");
    }
}
pub mod edge {
    pub mod v1 {
        tonic::include_proto!("sec.edge.v1");
    }
}
