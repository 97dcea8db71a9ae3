//! Client authentication at the token, revocation and introspection endpoints.
