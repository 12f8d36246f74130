//! The `Ready` condition the node controller writes on each resource it acts on, and the
//! status patch that writes it.

use k8s_openapi::NamespaceResourceScope;
use kube::{
    Api, Client, Resource, ResourceExt as _,
    api::{Patch, PatchParams},
};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::resource::kinds::{Condition, ConditionStatus, Status};

/// The one condition the controller owns.
pub const READY: &str = "Ready";

/// What the controller concluded about one resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub ready: bool,
    /// One CamelCase word: `Applied`, `Refused`, `Conflict`, `RouterDown`.
    pub reason: &'static str,
    /// One line for a person.
    pub message: String,
}

impl Verdict {
    #[must_use]
    pub fn ready(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            ready: true,
            reason,
            message: message.into(),
        }
    }

    #[must_use]
    pub fn not_ready(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            ready: false,
            reason,
            message: message.into(),
        }
    }

    /// The condition to write, or `None` when `current` already says the same about
    /// `generation` (writing it again would only wake every watcher). The transition time
    /// moves only when the status does.
    #[must_use]
    pub fn condition(
        &self,
        current: Option<&Status>,
        generation: Option<i64>,
    ) -> Option<Condition> {
        let status = if self.ready {
            ConditionStatus::True
        } else {
            ConditionStatus::False
        };
        let old = current.and_then(|s| s.conditions.iter().find(|c| c.type_ == READY));
        if let Some(old) = old
            && old.status == status
            && old.reason == self.reason
            && old.message == self.message
            && old.observed_generation == generation
        {
            return None;
        }
        let last_transition_time = match old {
            Some(old) if old.status == status => old.last_transition_time.clone(),
            _ => now(),
        };
        Some(Condition {
            type_: READY.to_owned(),
            status,
            reason: self.reason.to_owned(),
            message: self.message.clone(),
            last_transition_time,
            observed_generation: generation,
        })
    }
}

/// Now, in RFC 3339 (seconds), as Kubernetes writes times.
fn now() -> String {
    let now = time::OffsetDateTime::now_utc();
    let now = now.replace_nanosecond(0).unwrap_or(now);
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_owned())
}

/// Writes `condition` as the status of `object` (a merge patch of `/status`: the controller
/// owns the whole conditions list, which holds only `Ready`).
///
/// # Errors
/// When the API server refuses the patch.
pub async fn write<K>(client: &Client, object: &K, condition: Condition) -> Result<(), kube::Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let namespace = object.namespace().unwrap_or_default();
    let api: Api<K> = Api::namespaced(client.clone(), &namespace);
    let patch = json!({ "status": { "conditions": [condition] } });
    api.patch_status(
        &object.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .map(drop)
}

#[cfg(test)]
mod tests {
    use std::pin::pin;

    use http::{Request, Response};
    use kube::client::Body;
    use tower_test::mock;

    use super::*;
    use crate::resource::kinds::{Listener, ListenerSpec};

    fn listener() -> Listener {
        let mut l = Listener::new(
            "web",
            ListenerSpec {
                host: None,
                port: 8080,
                routing_key: None,
                namespace: None,
                allow_namespaces: Vec::new(),
                tls: None,
            },
        );
        l.metadata.namespace = Some("team-a".into());
        l.metadata.generation = Some(3);
        l
    }

    #[test]
    fn an_unchanged_verdict_writes_nothing_and_a_change_keeps_its_time_only_if_status_holds() {
        let ok = Verdict::ready("Applied", "listening");
        let first = ok.condition(None, Some(1)).expect("first");
        assert_eq!(first.status, ConditionStatus::True);
        let status = Status {
            conditions: vec![first.clone()],
        };
        assert_eq!(ok.condition(Some(&status), Some(1)), None);
        let newer = ok
            .condition(Some(&status), Some(2))
            .expect("new generation");
        assert_eq!(newer.last_transition_time, first.last_transition_time);
        assert_eq!(newer.observed_generation, Some(2));
        let refused = Verdict::not_ready("Refused", "port taken")
            .condition(Some(&status), Some(2))
            .expect("status changed");
        assert_eq!(refused.status, ConditionStatus::False);
        assert_eq!(refused.reason, "Refused");
    }

    /// The request the API server gets: a merge patch of the status subresource, carrying
    /// the condition as metav1.Condition spells it.
    #[tokio::test]
    async fn the_status_is_a_merge_patch_of_the_status_subresource() {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let server = tokio::spawn(async move {
            let mut handle = pin!(handle);
            let (request, send) = handle.next_request().await.expect("a request");
            assert_eq!(request.method(), http::Method::PATCH);
            assert_eq!(
                request.uri().path(),
                "/apis/skiff.io/v1alpha1/namespaces/team-a/listeners/web/status"
            );
            assert_eq!(
                request.headers()[http::header::CONTENT_TYPE],
                "application/merge-patch+json"
            );
            let body = request.into_body().collect_bytes().await.expect("the body");
            let patch: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
            let condition = &patch["status"]["conditions"][0];
            assert_eq!(condition["type"], "Ready");
            assert_eq!(condition["status"], "True");
            assert_eq!(condition["reason"], "Applied");
            assert_eq!(condition["observedGeneration"], 3);
            assert!(
                condition["lastTransitionTime"]
                    .as_str()
                    .is_some_and(|t| t.ends_with('Z'))
            );
            // The API server answers with the whole object, status merged in.
            let mut object = serde_json::to_value(listener()).expect("object");
            object["status"] = patch["status"].clone();
            send.send_response(Response::new(Body::from(
                serde_json::to_vec(&object).expect("JSON"),
            )));
        });
        let client = Client::new(service, "default");
        let l = listener();
        let condition = Verdict::ready("Applied", "listening on 0.0.0.0:8080")
            .condition(l.status.as_ref(), l.metadata.generation)
            .expect("a condition");
        write(&client, &l, condition).await.expect("patched");
        server.await.expect("the server saw the patch");
    }
}
