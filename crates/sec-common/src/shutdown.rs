//! Process signals → a cancellation token every task watches.

use tokio_util::sync::CancellationToken;

/// A token cancelled on the first SIGTERM or SIGINT. A second signal exits at once, for
/// an operator who does not want to wait out the grace period.
///
/// The handlers are installed before this returns (not in the spawned task), so a
/// SIGTERM that arrives right after start-up drains instead of killing the process.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    let mut signals = Signals::install();
    tokio::spawn(async move {
        signals.recv().await;
        tracing::info!("shutdown signal received, draining");
        t.cancel();
        signals.recv().await;
        tracing::warn!("second shutdown signal, exiting now");
        std::process::exit(130);
    });
    token
}

enum Signals {
    #[cfg(unix)]
    Unix {
        term: tokio::signal::unix::Signal,
        int: tokio::signal::unix::Signal,
    },
    CtrlC,
}

impl Signals {
    fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            if let (Ok(term), Ok(int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                return Signals::Unix { term, int };
            }
        }
        Signals::CtrlC
    }

    async fn recv(&mut self) {
        match self {
            #[cfg(unix)]
            Signals::Unix { term, int } => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            Signals::CtrlC => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}
