//! Users: the identity store the login page checks. argon2id passwords on the blocking
//! pool behind a semaphore, rehashed on login when the parameters change.
