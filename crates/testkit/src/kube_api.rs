//! A scripted Kubernetes API server: a `kube::Client` over
//! `tower_test::mock::pair`, so a test answers each call the client makes
//! and fails on a call it did not expect, or on one that does not come.

use std::time::Duration;

use axum::http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use kube::client::Body;
use serde_json::{json, Value};
use tower_test::mock::{self, Handle, SendResponse};

/// The server's side of the client [`client`] returns.
pub struct ApiServer(Handle<Request<Body>, Response<Body>>);

/// A client whose default namespace is `namespace`, and the server it calls.
pub fn client(namespace: &str) -> (kube::Client, ApiServer) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (kube::Client::new(service, namespace), ApiServer(handle))
}

/// One call the client made.
pub struct Call {
    /// Its method.
    pub method: Method,
    /// Its URI's path.
    pub path: String,
    /// Its URI's query, `""` without one.
    pub query: String,
    /// Its `content-type`, `""` without one.
    pub content_type: String,
    /// The body as JSON (`Null` when empty).
    pub body: Value,
    /// Where its answer goes.
    pub send: SendResponse<Response<Body>>,
}

impl Call {
    /// Answers the call with `body` as JSON.
    pub fn reply(self, code: StatusCode, body: &Value) {
        reply(self.send, code, body);
    }

    /// Whether the call watches (`watch=true`) rather than lists or reads.
    pub fn is_watch(&self) -> bool {
        self.query.split('&').any(|p| p == "watch=true")
    }
}

impl ApiServer {
    /// The next call, within a minute.
    pub async fn next(&mut self) -> Call {
        tokio::time::timeout(Duration::from_secs(60), self.until_gone())
            .await
            .expect("no call came within a minute")
            .expect("the client is gone")
    }

    /// The next call, however long it takes, or `None` once the client is
    /// dropped.
    pub async fn until_gone(&mut self) -> Option<Call> {
        let (request, send) = self.0.next_request().await?;
        let content_type = request
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let (method, uri) = (request.method().clone(), request.uri().clone());
        let bytes = request.into_body().collect().await.unwrap().to_bytes();
        Some(Call {
            method,
            path: uri.path().to_owned(),
            query: uri.query().unwrap_or_default().to_owned(),
            content_type,
            body: if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap()
            },
            send,
        })
    }

    /// The next call, which must be `method` on `path`: its body and the
    /// way to answer it.
    pub async fn expect(
        &mut self,
        method: Method,
        path: &str,
    ) -> (Value, SendResponse<Response<Body>>) {
        let call = self.next().await;
        assert_eq!(
            (&call.method, call.path.as_str()),
            (&method, path),
            "unexpected call {} {}?{}",
            call.method,
            call.path,
            call.query
        );
        (call.body, call.send)
    }

    /// Fails on any call within `period`.
    pub async fn silent_for(&mut self, period: Duration) {
        if let Ok(Some((request, _))) = tokio::time::timeout(period, self.0.next_request()).await {
            panic!("unexpected call {} {}", request.method(), request.uri());
        }
    }

    /// Fails if the client makes any call before it is dropped.
    pub async fn no_more_calls(mut self) {
        if let Some((request, _)) = self.0.next_request().await {
            panic!("unexpected call {} {}", request.method(), request.uri());
        }
    }
}

/// Answers a call with `body` as JSON.
pub fn reply(send: SendResponse<Response<Body>>, code: StatusCode, body: &Value) {
    respond(send, code, serde_json::to_vec(body).unwrap());
}

/// A watch's answer: these events, one JSON object a line, then the end of
/// the stream (a watcher then watches again from the last version).
pub fn reply_events(send: SendResponse<Response<Body>>, events: &[(&str, Value)]) {
    let mut body = Vec::new();
    for (kind, object) in events {
        serde_json::to_writer(&mut body, &json!({"type": kind, "object": object})).unwrap();
        body.push(b'\n');
    }
    respond(send, StatusCode::OK, body);
}

fn respond(send: SendResponse<Response<Body>>, code: StatusCode, body: Vec<u8>) {
    send.send_response(
        Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(Body::from(body))
            .unwrap(),
    );
}

/// A `Status` refusal, as the API server sends with a 4xx.
pub fn status(code: u16, reason: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
           "reason": reason, "code": code, "message": reason})
}
