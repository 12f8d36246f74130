//! The site policy at work: checks at every place a link, resource or stream is admitted,
//! denials counted and logged, and a policy change applied to what already exists.

use super::*;

impl Router {
    /// Replaces the site policy (`None` removes it) and applies it to what exists: incoming
    /// links from sites no longer allowed are closed, outgoing links to hosts no longer allowed
    /// stop (and resume when allowed again), connectors no longer allowed are withdrawn from
    /// the network. Listeners check each new connection. Returns what changed.
    pub(super) fn set_policy(
        self: &Arc<Self>,
        policy: Option<Policy>,
    ) -> Result<serde_json::Value, String> {
        let stored = match &policy {
            Some(p) => self
                .state
                .write_json("policy.json", p)
                .map_err(|e| e.to_string()),
            None => match std::fs::remove_file(self.state.root().join("policy.json")) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.to_string()),
                _ => Ok(()),
            },
        };
        stored.map_err(|e| format!("failed to store the policy: {e}"))?;
        self.gate.set(policy);

        let mut closed = Vec::new();
        let incoming: Vec<Arc<Link>> = {
            self.forwarding
                .links()
                .into_iter()
                .flat_map(|(_, links)| links)
                .filter(|l| l.direction == link::Direction::Incoming)
                .collect()
        };
        for link in incoming {
            if let Err(denied) = self.gate.check(|p| p.incoming_link(&link.peer)) {
                self.gate.denied(&denied, false);
                link.shut(denied.to_string());
                closed.push(link.peer.clone());
            }
        }

        let (mut stopped, mut resumed) = (Vec::new(), Vec::new());
        let outgoing: Vec<(String, LinkConfig, bool)> = {
            let inner = self.inner.lock().expect("router lock");
            inner
                .outgoing
                .iter()
                .map(|(name, o)| (name.clone(), o.config.clone(), o.denied.is_some()))
                .collect()
        };
        for (name, config, was_denied) in outgoing {
            let host = site::host_of(&config.url).unwrap_or(&config.url).to_owned();
            let now_denied = self.gate.check(|p| p.outgoing_link(&host)).is_err();
            if now_denied == was_denied {
                continue;
            }
            match self.load_link(&name) {
                // start_link checks the policy again and replaces (and stops) the old tasks.
                Ok((config, key)) => self.start_link(config, key),
                Err(e) => warn!(link = %name, error = %e, "failed to reload link"),
            }
            if now_denied {
                &mut stopped
            } else {
                &mut resumed
            }
            .push(name);
        }

        let (mut withdrawn, mut advertised) = (Vec::new(), Vec::new());
        let mut states = Vec::new();
        {
            let inner = self.inner.lock().expect("router lock");
            let mut routing = self.routing.lock().expect("routing lock");
            let connectors: Vec<Connector> = inner.connectors.values().cloned().collect();
            for c in connectors {
                let allowed = self
                    .gate
                    .check(|p| {
                        p.service(&c.routing_key)?;
                        p.exposed_resource(&c.host, c.port, None)
                    })
                    .is_ok();
                let was = self.forwarding.set_advertised(&c.name, allowed);
                if allowed && !was {
                    states.push(routing.add_local_key(&c.routing_key));
                    advertised.push(c.name);
                } else if !allowed && was {
                    states.push(routing.remove_local_key(&c.routing_key));
                    withdrawn.push(c.name);
                }
            }
        }
        // Each advertisement carries the whole local state; the newest supersedes the rest.
        if let Some(last) = states.pop() {
            self.flood(vec![last], None);
        }
        let refusing: Vec<String> = {
            let inner = self.inner.lock().expect("router lock");
            inner
                .listeners
                .values()
                .filter(|l| self.gate.check(|p| p.service(&l.spec.routing_key)).is_err())
                .map(|l| l.spec.name.clone())
                .collect()
        };
        info!(
            closed = closed.len(),
            stopped = stopped.len(),
            resumed = resumed.len(),
            withdrawn = withdrawn.len(),
            "site policy applied"
        );
        Ok(json!({
            "closedIncomingLinks": closed,
            "stoppedLinks": stopped,
            "resumedLinks": resumed,
            "withdrawnConnectors": withdrawn,
            "advertisedConnectors": advertised,
            "refusingListeners": refusing,
        }))
    }

    pub(super) fn policy_status(&self) -> serde_json::Value {
        let denials: BTreeMap<&str, u64> = self
            .gate
            .denials()
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(c, n)| (c.as_str(), n))
            .collect();
        json!({
            "policy": self.gate.policy(),
            "denials": denials,
        })
    }
}
