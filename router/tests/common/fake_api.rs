//! A Kubernetes API server's answers, served to kube's client through tower-test's mocked
//! service (as kube-rs tests its own client): lists, watches that stay open and carry events
//! as the test changes objects, and status patches written into the objects. No API server
//! can run on these machines; this speaks the same wire format (paths, list and watch-event
//! JSON, resource versions, merge patches of `/status`).

use std::{
    collections::BTreeMap,
    io,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use futures::channel::mpsc;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use kube::client::Body;
use serde_json::{Value, json};
use tokio::sync::Notify;

type Answer = BoxBody<Bytes, io::Error>;

/// Where a watch's events go: the body of its (never-ending) answer.
type WatchBody = mpsc::UnboundedSender<Result<Frame<Bytes>, io::Error>>;

/// One collection's objects by (namespace, name).
type Objects = BTreeMap<(String, String), Value>;

#[derive(Default)]
struct State {
    resource_version: u64,
    /// Plural ("listeners", "pods") -> objects.
    collections: BTreeMap<String, Objects>,
    /// Open watches: plural and the sender of its body.
    watches: Vec<(String, WatchBody)>,
    /// Status patches received: (plural, namespace, name, patch).
    patches: Vec<(String, String, String, Value)>,
    /// Objects written whole (created or replaced).
    writes: u64,
}

/// The fake API server.
#[derive(Clone, Default)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
}

fn api_version(plural: &str) -> &'static str {
    if plural == "pods" {
        "v1"
    } else {
        "skiff.io/v1alpha1"
    }
}

fn kind(plural: &str) -> &'static str {
    match plural {
        "sites" => "Site",
        "sitepolicies" => "SitePolicy",
        "listeners" => "Listener",
        "connectors" => "Connector",
        "links" => "Link",
        "accessgrants" => "AccessGrant",
        "accesstokens" => "AccessToken",
        "pods" => "Pod",
        _ => "Unknown",
    }
}

fn full(value: &Value, status: StatusCode) -> Response<Answer> {
    let body = Full::new(Bytes::from(serde_json::to_vec(value).expect("JSON")))
        .map_err(|never| match never {})
        .boxed();
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
}

fn not_found() -> Response<Answer> {
    full(
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "reason": "NotFound", "code": 404, "message": "not found"}),
        StatusCode::NOT_FOUND,
    )
}

impl FakeApi {
    /// A kube client whose every request this fake answers.
    pub fn client(&self) -> kube::Client {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Answer>>();
        let api = self.clone();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let response = api.answer(request).await;
                send.send_response(response);
            }
        });
        kube::Client::new(service, "default")
    }

    async fn answer(&self, request: Request<Body>) -> Response<Answer> {
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        let query = request.uri().query().unwrap_or_default().to_owned();
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match (method.as_str(), parts.as_slice()) {
            ("GET", ["apis", "skiff.io", "v1alpha1", plural] | ["api", "v1", plural]) => {
                if query.split('&').any(|q| q == "watch=true") {
                    self.watch(plural)
                } else {
                    self.list(plural)
                }
            }
            (
                "PATCH",
                [
                    "apis",
                    "skiff.io",
                    "v1alpha1",
                    "namespaces",
                    ns,
                    plural,
                    name,
                    "status",
                ],
            ) => {
                let body = request.into_body().collect_bytes().await.expect("body");
                let patch: Value = serde_json::from_slice(&body).expect("a JSON patch");
                self.patch_status(plural, ns, name, patch)
            }
            ("GET", ["api", "v1", "namespaces", ns, "secrets", name]) => {
                match self.get("secrets", ns, name) {
                    Some(secret) => full(&secret, StatusCode::OK),
                    None => not_found(),
                }
            }
            ("POST" | "PUT", ["api", "v1", "namespaces", ns, "secrets", ..]) => {
                let body = request.into_body().collect_bytes().await.expect("body");
                let mut secret: Value = serde_json::from_slice(&body).expect("a Secret");
                let name = secret["metadata"]["name"]
                    .as_str()
                    .expect("named")
                    .to_owned();
                let exists = self.get("secrets", ns, &name).is_some();
                if exists == (method == "POST") {
                    return full(
                        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                "reason": if exists { "AlreadyExists" } else { "NotFound" },
                                "code": if exists { 409 } else { 404 }, "message": name}),
                        if exists {
                            StatusCode::CONFLICT
                        } else {
                            StatusCode::NOT_FOUND
                        },
                    );
                }
                secret["metadata"]["namespace"] = json!(ns);
                self.store("secrets", ns, &name, secret.clone());
                full(
                    &self.get("secrets", ns, &name).unwrap_or(secret),
                    StatusCode::OK,
                )
            }
            ("DELETE", ["api", "v1", "namespaces", ns, "secrets", name]) => {
                match self.get("secrets", ns, name) {
                    Some(_) => {
                        self.delete("secrets", ns, name);
                        full(
                            &json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
                            StatusCode::OK,
                        )
                    }
                    None => not_found(),
                }
            }
            _ => full(
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "message": format!("{method} {path} is not served here"),
                        "reason": "NotFound", "code": 404}),
                StatusCode::NOT_FOUND,
            ),
        }
    }

    fn list(&self, plural: &str) -> Response<Answer> {
        let state = self.state.lock().expect("state");
        let items: Vec<Value> = state
            .collections
            .get(plural)
            .map(|c| c.values().cloned().collect())
            .unwrap_or_default();
        full(
            &json!({
                "apiVersion": api_version(plural),
                "kind": format!("{}List", kind(plural)),
                "metadata": {"resourceVersion": state.resource_version.to_string()},
                "items": items,
            }),
            StatusCode::OK,
        )
    }

    fn watch(&self, plural: &str) -> Response<Answer> {
        let (tx, rx) = mpsc::unbounded();
        self.state
            .lock()
            .expect("state")
            .watches
            .push((plural.to_owned(), tx));
        Response::new(StreamBody::new(rx).boxed())
    }

    /// Sends a watch event to every watch of `plural`.
    fn event(state: &mut State, plural: &str, kind: &str, object: &Value) {
        let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).expect("JSON");
        line.push(b'\n');
        state.watches.retain(|(p, tx)| {
            p != plural
                || tx
                    .unbounded_send(Ok(Frame::data(Bytes::from(line.clone()))))
                    .is_ok()
        });
    }

    fn patch_status(&self, plural: &str, ns: &str, name: &str, patch: Value) -> Response<Answer> {
        let mut state = self.state.lock().expect("state");
        state.resource_version += 1;
        let rv = state.resource_version.to_string();
        let Some(object) = state
            .collections
            .get_mut(plural)
            .and_then(|c| c.get_mut(&(ns.to_owned(), name.to_owned())))
        else {
            return full(
                &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                        "reason": "NotFound", "code": 404, "message": "not found"}),
                StatusCode::NOT_FOUND,
            );
        };
        // A merge patch: `status.conditions`, a list, is replaced whole.
        object["status"] = patch["status"].clone();
        object["metadata"]["resourceVersion"] = json!(rv);
        let object = object.clone();
        state
            .patches
            .push((plural.to_owned(), ns.to_owned(), name.to_owned(), patch));
        Self::event(&mut state, plural, "MODIFIED", &object);
        drop(state);
        self.changed.notify_waiters();
        full(&object, StatusCode::OK)
    }

    /// Creates or changes an object (a change of `spec` moves its generation, as the API
    /// server does for custom resources).
    pub fn apply(&self, plural: &str, ns: &str, name: &str, spec: Value) {
        let mut state = self.state.lock().expect("state");
        state.resource_version += 1;
        let rv = state.resource_version;
        let objects = state.collections.entry(plural.to_owned()).or_default();
        let key = (ns.to_owned(), name.to_owned());
        let (event, object) = match objects.get_mut(&key) {
            Some(object) => {
                if object["spec"] != spec {
                    let generation = object["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
                    object["metadata"]["generation"] = json!(generation);
                    object["spec"] = spec;
                }
                object["metadata"]["resourceVersion"] = json!(rv.to_string());
                ("MODIFIED", object.clone())
            }
            None => {
                let object = json!({
                    "apiVersion": api_version(plural),
                    "kind": kind(plural),
                    "metadata": {
                        "name": name, "namespace": ns, "generation": 1,
                        "uid": format!("00000000-0000-4000-8000-{rv:012}"),
                        "resourceVersion": rv.to_string(),
                        "creationTimestamp": format!("2026-11-22T10:{:02}:{:02}Z", rv / 60 % 60, rv % 60),
                    },
                    "spec": spec,
                });
                objects.insert(key, object.clone());
                ("ADDED", object)
            }
        };
        Self::event(&mut state, plural, event, &object);
        drop(state);
        self.changed.notify_waiters();
    }

    /// An object as stored.
    pub fn get(&self, plural: &str, ns: &str, name: &str) -> Option<Value> {
        let state = self.state.lock().expect("state");
        state
            .collections
            .get(plural)?
            .get(&(ns.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Stores an object written whole (a create or replace), with a new resource version.
    fn store(&self, plural: &str, ns: &str, name: &str, mut object: Value) {
        let mut state = self.state.lock().expect("state");
        state.resource_version += 1;
        object["metadata"]["resourceVersion"] = json!(state.resource_version.to_string());
        state
            .collections
            .entry(plural.to_owned())
            .or_default()
            .insert((ns.to_owned(), name.to_owned()), object);
        state.writes += 1;
        drop(state);
        self.changed.notify_waiters();
    }

    /// Puts a Secret with `data` (each value base64-encoded here), as `kubectl create secret`.
    pub fn put_secret(&self, ns: &str, name: &str, data: &[(&str, &str)]) {
        use base64::Engine as _;
        let data: serde_json::Map<String, Value> = data
            .iter()
            .map(|(k, v)| {
                let encoded = base64::engine::general_purpose::STANDARD.encode(v);
                ((*k).to_owned(), json!(encoded))
            })
            .collect();
        let uid = format!("secret-{ns}-{name}");
        self.store(
            "secrets",
            ns,
            name,
            json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                   "metadata": {"name": name, "namespace": ns, "uid": uid}, "data": data}),
        );
    }

    /// How many objects were written whole (created or replaced) so far.
    pub fn writes(&self) -> u64 {
        self.state.lock().expect("state").writes
    }

    /// Waits (up to ten seconds) until `ok` holds for the object (`None`: there is none).
    pub async fn wait_object(
        &self,
        plural: &str,
        ns: &str,
        name: &str,
        ok: impl Fn(Option<&Value>) -> bool,
    ) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let changed = self.changed.notified();
            let object = self.get(plural, ns, name);
            if ok(object.as_ref()) {
                return object;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                panic!("{plural} {ns}/{name} never as expected; last: {object:?}");
            }
        }
    }

    /// Deletes an object.
    pub fn delete(&self, plural: &str, ns: &str, name: &str) {
        let mut state = self.state.lock().expect("state");
        state.resource_version += 1;
        let rv = state.resource_version.to_string();
        let removed = state
            .collections
            .get_mut(plural)
            .and_then(|c| c.remove(&(ns.to_owned(), name.to_owned())));
        if let Some(mut object) = removed {
            object["metadata"]["resourceVersion"] = json!(rv);
            Self::event(&mut state, plural, "DELETED", &object);
        }
        drop(state);
        self.changed.notify_waiters();
    }

    /// The object's `Ready` condition, if it has one.
    pub fn ready(&self, plural: &str, ns: &str, name: &str) -> Option<Value> {
        let state = self.state.lock().expect("state");
        let object = state
            .collections
            .get(plural)?
            .get(&(ns.to_owned(), name.to_owned()))?;
        object["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == "Ready")
            .cloned()
    }

    /// How many status patches the object received.
    pub fn patches(&self, plural: &str, ns: &str, name: &str) -> usize {
        let state = self.state.lock().expect("state");
        state
            .patches
            .iter()
            .filter(|(p, n, m, _)| p == plural && n == ns && m == name)
            .count()
    }

    /// Waits (up to ten seconds) until the object's Ready condition satisfies `ok`.
    pub async fn wait_ready(
        &self,
        plural: &str,
        ns: &str,
        name: &str,
        ok: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let changed = self.changed.notified();
            if let Some(ready) = self.ready(plural, ns, name)
                && ok(&ready)
            {
                return ready;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                panic!(
                    "{plural} {ns}/{name}: Ready never as expected; last: {:?}",
                    self.ready(plural, ns, name)
                );
            }
        }
    }
}
