//! Every relay watches its namespace's `OutboxRelay` resources (kube-runtime's
//! watcher: one list, then a watch, resumed and re-listed as needed) and
//! applies each destination's spec to its live controls within moments.
//! Without a resource, or without the CRD, the flags apply.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use futures::StreamExt;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, ResourceExt};
use relay::Controls;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::resource::{settings, OutboxRelay};

/// The resources seen, by name.
pub type Resources = BTreeMap<String, OutboxRelay>;

/// Applies the watched resources to a relay's destinations.
pub struct SpecWatch {
    api: Api<OutboxRelay>,
    selector: Option<String>,
    controls: Vec<Arc<Controls>>,
    seen: watch::Sender<Arc<Resources>>,
    /// What was warned about already: each is said once, until it is
    /// resolved and happens again.
    warned: BTreeSet<String>,
}

impl SpecWatch {
    /// Watches `api`'s resources (those matching the label `selector`, if
    /// any) for `controls`.
    pub fn new(
        api: Api<OutboxRelay>,
        selector: Option<String>,
        controls: Vec<Arc<Controls>>,
    ) -> Self {
        Self {
            api,
            selector,
            controls,
            seen: watch::Sender::new(Arc::default()),
            warned: BTreeSet::new(),
        }
    }

    /// The resources as last seen, for the status writer.
    pub fn resources(&self) -> watch::Receiver<Arc<Resources>> {
        self.seen.subscribe()
    }

    /// Runs until `shutdown`. API errors (no CRD, no permission, the API
    /// server away) are warned about once and retried with backoff; the
    /// settings last applied stay meanwhile, so a paused destination stays
    /// paused while the API server is away.
    pub async fn run(
        mut self,
        shutdown: CancellationToken,
    ) -> Result<(), std::convert::Infallible> {
        let mut config = watcher::Config::default();
        if let Some(selector) = &self.selector {
            config = config.labels(selector);
        }
        let stream = watcher(self.api.clone(), config).default_backoff();
        let mut stream = std::pin::pin!(stream);
        let mut listing: Option<Resources> = None;
        let mut current = Resources::new();
        loop {
            let event = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                event = stream.next() => event,
            };
            let Some(event) = event else {
                return Ok(());
            };
            match event {
                Ok(watcher::Event::Init) => listing = Some(Resources::new()),
                Ok(watcher::Event::InitApply(r)) => {
                    if let Some(listing) = &mut listing {
                        listing.insert(r.name_any(), r);
                    }
                }
                Ok(watcher::Event::InitDone) => {
                    current = listing.take().unwrap_or_default();
                    self.resolved("api");
                    self.apply(&current);
                }
                Ok(watcher::Event::Apply(r)) => {
                    current.insert(r.name_any(), r);
                    self.apply(&current);
                }
                Ok(watcher::Event::Delete(r)) => {
                    current.remove(&r.name_any());
                    self.apply(&current);
                }
                Err(e) => self.warn_once("api", || {
                    tracing::warn!(error = %e, "cannot watch OutboxRelay resources (is the CRD installed, and may this relay list and watch them?); each destination keeps its current settings, the flags unless a resource set others; retrying")
                }),
            }
        }
    }

    /// Applies to each destination the spec of its resource, or its flags
    /// when it has none.
    fn apply(&mut self, resources: &Resources) {
        self.seen.send_replace(Arc::new(resources.clone()));
        for controls in self.controls.clone() {
            let destination = controls.destination().as_str();
            match steering(resources, destination) {
                Some((resource, ignored)) => {
                    self.resolved(&format!("missing {destination}"));
                    if !ignored.is_empty() {
                        let key = format!("several {destination}");
                        self.warn_once(&key, || tracing::warn!(destination, used = %resource.name_any(), ?ignored, "several OutboxRelay resources name this destination; the oldest applies"));
                    }
                    controls.apply(settings(&resource.spec, controls.flags()));
                }
                None => {
                    self.warn_once(&format!("missing {destination}"), || {
                        tracing::warn!(
                            destination,
                            "no OutboxRelay resource names this destination; its flags apply"
                        )
                    });
                    controls.apply(controls.flags());
                }
            }
        }
    }

    fn warn_once(&mut self, key: &str, warn: impl FnOnce()) {
        if self.warned.insert(key.to_owned()) {
            warn();
        }
    }

    fn resolved(&mut self, key: &str) {
        self.warned.remove(key);
    }
}

/// The resource that steers `destination`: the oldest naming it (by
/// creation, then name), and the names of any others.
pub fn steering<'a>(
    resources: &'a Resources,
    destination: &str,
) -> Option<(&'a OutboxRelay, Vec<String>)> {
    let mut naming: Vec<&OutboxRelay> = resources
        .values()
        .filter(|r| r.spec.destination == destination)
        .collect();
    naming.sort_by_key(|r| (r.metadata.creation_timestamp.clone(), r.name_any()));
    let mut naming = naming.into_iter();
    let first = naming.next()?;
    Some((first, naming.map(ResourceExt::name_any).collect()))
}
