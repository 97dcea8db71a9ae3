//! OAuth client management and authentication: validation of settings, server-generated
//! secrets (256 bits, keyed hash, constant-time check), CRUD with compare-and-set.
