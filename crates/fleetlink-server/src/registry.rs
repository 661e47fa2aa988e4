//! Finds or starts the actor of a device, on the arbiter its id hashes to.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use actix::{Actor, Addr};
use fleetlink_core::DeviceId;
use fleetlink_store::{DeviceState, Store, StoreError};

use crate::actor::{ActorSettings, DeviceActor, StoredState};

/// Devices whose stored state [`DeviceRegistry::start_all`] reads at once.
const START_PAGE: usize = 1_000;

/// Every device actor started so far, by device id.
#[derive(Debug)]
pub(crate) struct DeviceRegistry {
    actors: Mutex<HashMap<DeviceId, Addr<DeviceActor>>>,
    arbiters: Vec<actix::ArbiterHandle>,
    store: Arc<dyn Store>,
    /// One copy for every actor: a device's actor is memory for as long as the server runs.
    settings: Arc<ActorSettings>,
}

impl DeviceRegistry {
    pub(crate) fn new(
        arbiters: Vec<actix::ArbiterHandle>,
        store: Arc<dyn Store>,
        settings: ActorSettings,
    ) -> Self {
        Self {
            actors: Mutex::new(HashMap::new()),
            arbiters,
            store,
            settings: Arc::new(settings),
        }
    }

    /// The actor of `id`, if it was started.
    pub(crate) fn get(&self, id: &DeviceId) -> Option<Addr<DeviceActor>> {
        self.actors.lock().ok()?.get(id).cloned()
    }

    /// Every started actor.
    pub(crate) fn all(&self) -> Vec<Addr<DeviceActor>> {
        self.actors
            .lock()
            .map(|a| a.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Every started actor with its device id, in id order.
    pub(crate) fn all_by_id(&self) -> Vec<(DeviceId, Addr<DeviceActor>)> {
        let mut all: Vec<_> = self
            .actors
            .lock()
            .map(|a| a.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Starts the actor of every provisioned device: fleet queries, standing queries and command
    /// deadlines are served by the actors' live state, so every device needs one. The stored
    /// state comes in pages of [`START_PAGE`] devices, one store read per page.
    pub(crate) async fn start_all(&self) -> Result<usize, StoreError> {
        let mut after = None;
        let mut started = 0;
        loop {
            let page = self.store.device_states(after.clone(), START_PAGE).await?;
            let Some(last) = page.last() else {
                return Ok(started);
            };
            after = Some(last.record.id.clone());
            for state in page {
                self.start(state)?;
                started += 1;
            }
        }
    }

    /// The actor of a provisioned device, started (with its stored state) if needed.
    pub(crate) async fn get_or_start(
        &self,
        id: &DeviceId,
    ) -> Result<Addr<DeviceActor>, StoreError> {
        if let Some(addr) = self.get(id) {
            return Ok(addr);
        }
        let state = self
            .store
            .device_state(id)
            .await?
            .ok_or_else(|| StoreError::UnknownDevice(id.clone()))?;
        self.start(state)
    }

    /// Starts the actor of `state`'s device on the arbiter its id hashes to, unless one was
    /// started meanwhile (then that one is the answer: its state is at least as new).
    pub(crate) fn start(&self, state: DeviceState) -> Result<Addr<DeviceActor>, StoreError> {
        let DeviceState {
            record,
            twin,
            open_commands,
            pending_direct,
            last_presence,
        } = state;
        let id = record.id;
        let mut actors = self
            .actors
            .lock()
            .map_err(|_| StoreError::Task("device registry poisoned".into()))?;
        if let Some(addr) = actors.get(&id) {
            return Ok(addr.clone());
        }
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        id.hash(&mut hasher);
        let arbiter = &self.arbiters[(hasher.finish() % self.arbiters.len() as u64) as usize];
        let store = self.store.clone();
        let settings = self.settings.clone();
        let device = id.clone();
        let stored = StoredState {
            last_presence,
            pending_direct,
            tags: record.tags,
            attributes: record.attributes,
            last_seq: record.last_seq,
            last_values: record.last_values,
            twin,
            open_commands,
        };
        let addr = DeviceActor::start_in_arbiter(arbiter, move |_| {
            DeviceActor::new(device, store, stored, settings)
        });
        actors.insert(id, addr.clone());
        Ok(addr)
    }
}
