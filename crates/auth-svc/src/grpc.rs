//! `sec.auth.v1.AuthService`: validation and proto mapping; authorization is the host's.

use std::sync::Arc;

use sec_proto::auth::v1::auth_service_server::AuthService;
use sec_proto::auth::v1::*;
use tonic::{Request, Response, Status};

use crate::engine::AuthServer;

pub struct AuthApi {
    #[allow(dead_code)]
    server: Arc<AuthServer>,
}

impl AuthApi {
    pub fn new(server: Arc<AuthServer>) -> Self {
        Self { server }
    }
}

macro_rules! pending {
    ($($name:ident($req:ty) -> $resp:ty;)*) => {
        #[tonic::async_trait]
        impl AuthService for AuthApi {
            $(async fn $name(&self, _r: Request<$req>) -> Result<Response<$resp>, Status> {
                Err(Status::unimplemented(stringify!($name)))
            })*
        }
    };
}

pending! {
    create_client(CreateClientRequest) -> ClientWithSecret;
    get_client(GetClientRequest) -> Client;
    list_clients(ListClientsRequest) -> ListClientsResponse;
    update_client(UpdateClientRequest) -> Client;
    delete_client(DeleteClientRequest) -> DeleteClientResponse;
    rotate_client_secret(RotateClientSecretRequest) -> ClientWithSecret;
    create_user(CreateUserRequest) -> User;
    get_user(GetUserRequest) -> User;
    list_users(ListUsersRequest) -> ListUsersResponse;
    update_user(UpdateUserRequest) -> User;
    set_password(SetPasswordRequest) -> SetPasswordResponse;
    list_scopes(ListScopesRequest) -> ListScopesResponse;
}
