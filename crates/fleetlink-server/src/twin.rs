//! The device twin, kept by the device's actor: the reported document (patched by the device over
//! its control stream) and the desired document (patched by operators). Every change is written to
//! the store before it is answered; every change of the desired document sends the device its new
//! delta. The rules (merge patches, versions, deltas) live in `fleetlink_core::twin`.

use actix::prelude::*;
use fleetlink_core::presence::SessionId;
use fleetlink_core::twin::{TwinDoc, TwinError, TwinPatch, check_version, delta};
use fleetlink_proto::v1;
use fleetlink_store::{StoreError, TwinSide};

use crate::actor::{DeviceActor, Link};
use crate::now_us;

/// Why a twin request failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TwinRequestError {
    /// The patch is invalid or the expected version is stale.
    #[error(transparent)]
    Twin(#[from] TwinError),
    /// The store could not write it.
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    /// The session sending a report is not the device's current one.
    #[error("this connection was replaced by a newer one of the same device")]
    NotCurrent,
}

/// Both documents of a twin with the delta between them.
#[derive(Debug, Clone)]
pub(crate) struct TwinView {
    pub reported: TwinDoc,
    pub desired: TwinDoc,
}

impl TwinView {
    pub(crate) fn to_proto(&self, device: &str) -> v1::Twin {
        v1::Twin {
            device_id: device.to_owned(),
            reported_json: self.reported.to_json().to_string(),
            reported_version: self.reported.version(),
            desired_json: self.desired.to_json().to_string(),
            desired_version: self.desired.version(),
            delta_json: serde_json::Value::Object(delta(&self.desired, &self.reported)).to_string(),
            reported_metadata_json: self.reported.metadata_json().to_string(),
            desired_metadata_json: self.desired.metadata_json().to_string(),
        }
    }
}

impl DeviceActor {
    fn twin_view(&self) -> TwinView {
        TwinView {
            reported: self.reported.clone(),
            desired: self.desired.clone(),
        }
    }

    /// The delta frame for the device's current documents.
    pub(crate) fn delta_frame(&self) -> v1::TwinDelta {
        v1::TwinDelta {
            desired_version: self.desired.version(),
            delta_json: serde_json::Value::Object(delta(&self.desired, &self.reported)).to_string(),
            desired_json: self.desired.to_json().to_string(),
        }
    }

    pub(crate) fn send_delta(&self) {
        if let Some(link) = &self.link {
            link.delta.send_replace(self.delta_frame());
        }
    }

    /// A twin document changed: tell twin subscribers and the standing queries that read twins.
    fn twin_changed(&mut self, side: &'static str) {
        let doc = if side == "desired" {
            &self.desired
        } else {
            &self.reported
        };
        crate::fleet::publish(&self.settings.fleet.bus.twin, Some(&self.id), || {
            v1::event::Event::Twin(v1::TwinChange {
                device_id: self.id.to_string(),
                side: side.to_owned(),
                version: doc.version(),
                doc_json: doc.to_json().to_string(),
                delta_json: serde_json::Value::Object(delta(&self.desired, &self.reported))
                    .to_string(),
            })
        });
        self.facts_changed(fleetlink_core::query::Reads {
            twin: true,
            ..Default::default()
        });
    }
}

/// Read the twin.
#[derive(Message)]
#[rtype(result = "TwinView")]
pub(crate) struct GetTwin;

impl Handler<GetTwin> for DeviceActor {
    type Result = MessageResult<GetTwin>;

    fn handle(&mut self, _: GetTwin, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.twin_view())
    }
}

/// An operator patches the desired document.
#[derive(Message)]
#[rtype(result = "Result<TwinView, TwinRequestError>")]
pub(crate) struct UpdateDesired {
    pub patch: TwinPatch,
    pub expected_version: Option<u64>,
}

impl Handler<UpdateDesired> for DeviceActor {
    type Result = ResponseFuture<Result<TwinView, TwinRequestError>>;

    fn handle(&mut self, msg: UpdateDesired, _: &mut Self::Context) -> Self::Result {
        let result = (|| {
            check_version(msg.expected_version, self.desired.version())?;
            let mut desired = self.desired.clone();
            let changed = desired.apply(&msg.patch, now_us())?;
            Ok::<_, TwinError>((desired, changed))
        })();
        let (desired, changed) = match result {
            Ok(r) => r,
            Err(e) => return Box::pin(async move { Err(e.into()) }),
        };
        if !changed {
            let view = self.twin_view();
            return Box::pin(async move { Ok(view) });
        }
        // Queued now, so writes of this device land in the order they were made.
        let write = self.store.save_twin(&self.id, TwinSide::Desired, &desired);
        self.desired = desired;
        tracing::info!(device = %self.id, version = self.desired.version(), "desired twin updated");
        self.send_delta();
        self.twin_changed("desired");
        let view = self.twin_view();
        Box::pin(async move {
            write.await?;
            Ok(view)
        })
    }
}

/// The device patches its reported document.
#[derive(Message)]
#[rtype(result = "Result<u64, TwinRequestError>")]
pub(crate) struct ReportTwin {
    pub session: SessionId,
    pub patch: TwinPatch,
}

impl Handler<ReportTwin> for DeviceActor {
    type Result = ResponseFuture<Result<u64, TwinRequestError>>;

    fn handle(&mut self, msg: ReportTwin, _: &mut Self::Context) -> Self::Result {
        if self.link.as_ref().map(|l| l.session) != Some(msg.session) {
            return Box::pin(async { Err(TwinRequestError::NotCurrent) });
        }
        let mut reported = self.reported.clone();
        match reported.apply(&msg.patch, now_us()) {
            Err(e) => Box::pin(async move { Err(e.into()) }),
            Ok(false) => {
                let version = reported.version();
                Box::pin(async move { Ok(version) })
            }
            Ok(true) => {
                let write = self
                    .store
                    .save_twin(&self.id, TwinSide::Reported, &reported);
                self.reported = reported;
                let version = self.reported.version();
                tracing::debug!(device = %self.id, version, "reported twin updated");
                self.twin_changed("reported");
                Box::pin(async move {
                    write.await?;
                    Ok(version)
                })
            }
        }
    }
}

/// The session's Welcome is out: the device can receive deltas and commands on it now.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Ready(pub Link);

impl Handler<Ready> for DeviceActor {
    type Result = ();

    fn handle(&mut self, Ready(link): Ready, ctx: &mut Self::Context) {
        if self.presence_session() != Some(link.session) {
            return; // replaced before it got here
        }
        link.delta.send_replace(self.delta_frame());
        self.link = Some(link);
        self.outbox.connection_lost(); // anything in flight on an older link goes again
        self.dispatch_commands(ctx);
        self.deliver_direct(ctx);
    }
}
