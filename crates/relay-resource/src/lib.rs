//! The relays' face in Kubernetes: an `OutboxRelay` custom resource per
//! destination.
//!
//! - [`resource`]: the type, from which the CRD is generated; its spec is
//!   what may change on running relays (paused, limits, batch size,
//!   breaker), its status what the leader reports.
//! - [`spec_watch`]: every relay watches the resources and applies each
//!   destination's spec to its live [`relay::Controls`].
//! - [`status`]: the leader writes the statuses; Events on breaker changes
//!   and leadership.

pub mod resource;
pub mod spec_watch;
pub mod status;

pub use resource::{crd_yaml, OutboxRelay, OutboxRelaySpec, OutboxRelayStatus};
pub use spec_watch::SpecWatch;
pub use status::{Sources, StatusWriter, FIELD_MANAGER};

use kube::Api;

/// Steers `relay` from the `OutboxRelay` resources of `namespace` (those
/// matching the label `selector`, if any): the spec watch and the status
/// writer run under the relay's supervisor until it stops.
pub fn steer(
    relay: &relay::Relay,
    client: kube::Client,
    namespace: &str,
    selector: Option<String>,
    identity: &str,
) {
    let api: Api<OutboxRelay> = Api::namespaced(client, namespace);
    let watch = SpecWatch::new(api.clone(), selector, relay.controls().to_vec());
    let writer = StatusWriter::new(
        api,
        Sources {
            identity: identity.to_owned(),
            controls: relay.controls().to_vec(),
            leader: relay.leader(),
            backlog: relay.backlog(),
            resources: watch.resources(),
            store: Some(relay.store()),
        },
    );
    relay.spawn("outboxrelay spec watch", watch.run(relay.shutdown()));
    relay.spawn("outboxrelay status", writer.run(relay.shutdown()));
}
