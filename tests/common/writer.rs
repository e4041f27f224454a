//! Operations that hold or pass through the storage writer, for tests
//! that need the writer busy or its queue full.

use std::sync::mpsc;
use std::time::Duration;

use pipit::commit::{Operation, Outcome};
use pipit::service::Ctx;
use pipit::store::{StorageError, Txn};

/// Holds the writer thread inside `apply` until released (or 60 s).
pub struct Block {
    pub entered: Option<mpsc::Sender<()>>,
    pub release: mpsc::Receiver<()>,
}

impl Operation<Ctx> for Block {
    fn apply(&mut self, _: &mut Ctx, _: &mut Txn<'_>) -> Result<(), StorageError> {
        if let Some(e) = self.entered.take() {
            let _ = e.send(());
        }
        let _ = self.release.recv_timeout(Duration::from_secs(60));
        Ok(())
    }
    fn finish(self: Box<Self>, _: &mut Ctx, _: Outcome<'_>) {}
}

/// Does nothing: fills a slot of the writer's queue.
pub struct Noop;

impl Operation<Ctx> for Noop {
    fn apply(&mut self, _: &mut Ctx, _: &mut Txn<'_>) -> Result<(), StorageError> {
        Ok(())
    }
    fn finish(self: Box<Self>, _: &mut Ctx, _: Outcome<'_>) {}
}
