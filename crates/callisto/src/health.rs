//! What `GET /healthz` answers: `ok` while every part that should run
//! does, else 503 with a line for each part that stopped, so that a
//! supervisor (a load balancer, Kubernetes, a systemd watchdog script)
//! restarts the server. The web server answering is itself the check of
//! the web part.

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use callisto_turn::net::TurnHealth;

/// The parts' checks: each says what of it has stopped.
#[derive(Clone, Default)]
pub struct Health {
    checks: Vec<Arc<dyn Fn() -> Vec<String> + Send + Sync>>,
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

    /// What has stopped; none when all is well.
    pub fn problems(&self) -> Vec<String> {
        self.checks.iter().flat_map(|check| check()).collect()
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
