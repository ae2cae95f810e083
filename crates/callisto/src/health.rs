//! What `GET /healthz` answers: `ok` while every part that should run
//! does, else 503 with a line for each part that stopped, so that a
//! supervisor (a load balancer, Kubernetes, systemd's watchdog) restarts
//! the server. The web server answering is itself the check of the web
//! part; the background tasks that keep the server current (certificate
//! reloads, files re-read on SIGHUP, alternate-server checks) are spawned
//! here, so that one a bug ended is seen.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, PoisonError};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use callisto_turn::net::TurnHealth;
use futures_util::FutureExt;

/// The parts' checks: each says what of it has stopped. Clones share the
/// background tasks' fate.
#[derive(Clone, Default)]
pub struct Health {
    checks: Vec<Arc<dyn Fn() -> Vec<String> + Send + Sync>>,
    /// Background tasks that a panic ended.
    fallen: Arc<Mutex<Vec<&'static str>>>,
}

impl Health {
    /// Adds a check.
    pub fn with(mut self, check: impl Fn() -> Vec<String> + Send + Sync + 'static) -> Self {
        self.checks.push(Arc::new(check));
        self
    }

    /// Adds the TURN service's check.
    pub fn with_turn(self, turn: TurnHealth) -> Self {
        self.with(move || turn.problems())
    }

    /// Spawns `task`, the part called `what`, which runs for as long as
    /// the server does: if a panic ends it, the health says so from then
    /// on.
    pub fn spawn_vital(&self, what: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        let fallen = self.fallen.clone();
        tokio::spawn(async move {
            if AssertUnwindSafe(task).catch_unwind().await.is_err() {
                // The panic itself was logged by the panic hook.
                tracing::error!("{what} stopped: a bug; /healthz now fails");
                fallen
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(what);
            }
        });
    }

    /// What has stopped; none when all is well.
    pub fn problems(&self) -> Vec<String> {
        let fallen = self.fallen.lock().unwrap_or_else(PoisonError::into_inner);
        (self.checks.iter().flat_map(|check| check()))
            .chain(fallen.iter().map(|what| format!("{what} has stopped")))
            .collect()
    }

    /// The answer to `GET /healthz`.
    pub fn response(&self) -> Response {
        let problems = self.problems();
        if problems.is_empty() {
            return "ok\n".into_response();
        }
        let mut body = problems.join("\n");
        body.push_str("\nthe log says why; restart callisto\n");
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn answer(health: &Health) -> (StatusCode, String) {
        let res = health.response();
        let status = res.status();
        let body = axum::body::to_bytes(res.into_body(), 1 << 16)
            .await
            .unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    /// A background task that a panic ends is named; one that ends by
    /// itself (as at shutdown) is not.
    #[tokio::test]
    async fn a_background_task_a_panic_ended_is_named() {
        let health = Health::default();
        let done = tokio::sync::oneshot::channel::<()>();
        health.spawn_vital("the quiet task", async move {
            let _ = done.1.await;
        });
        health.spawn_vital("the certificate reloader", async {
            panic!("the test's panic");
        });
        drop(done.0);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while health.problems().is_empty() {
            assert!(std::time::Instant::now() < deadline, "never named");
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(
            health.with(Vec::new).problems(),
            ["the certificate reloader has stopped"]
        );
    }

    #[tokio::test]
    async fn ok_until_a_part_stops_then_503_saying_which() {
        let healthy = Health::default().with(Vec::new);
        assert_eq!(answer(&healthy).await, (StatusCode::OK, "ok\n".into()));

        let broken = healthy
            .with(|| vec!["TURN UDP worker 1 (of 2) has stopped".into()])
            .with(|| vec!["the TURN TLS listener on 127.0.0.1:5349 has stopped".into()]);
        let (status, body) = answer(&broken).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            body,
            "TURN UDP worker 1 (of 2) has stopped\n\
             the TURN TLS listener on 127.0.0.1:5349 has stopped\n\
             the log says why; restart callisto\n"
        );
    }
}
