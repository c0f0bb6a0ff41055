//! Where tasks live: the [`TaskStore`] trait, and [`RedbStore`], an embedded transactional store
//! on local disk with group commit.
//!
//! A 202 is answered only once the task is on disk. One fsync per submission would cap a disk at
//! a few hundred tasks per second, so writes from every request are queued to one writer thread,
//! which commits all that queued while the previous commit was syncing in one transaction: under
//! load a commit carries hundreds of tasks for the price of one sync.

use std::{
    path::Path,
    sync::{Arc, mpsc},
};

use futures::future::BoxFuture;
use redb::{Database, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use super::model::{Task, TaskId, TaskStatus};

/// Why the store failed. Every failure is the disk's or the database's: the caller answers 503
/// and stores nothing.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("task store: {0}")]
    Db(#[source] Box<redb::Error>),
    /// A record does not decode (written by another build, or damaged).
    #[error("task store: record {id} does not decode: {source}")]
    Decode {
        /// The record's key.
        id: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The writer thread is gone (the process is shutting down).
    #[error("task store: the writer has stopped")]
    Closed,
    /// Redis failed or did not answer in time.
    #[error("task store: redis: {0}")]
    Redis(String),
}

fn db<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Db(Box::new(e.into()))
}

/// One page of a key's tasks, and the cursor to continue from when more may follow.
pub type Page = (Vec<Task>, Option<TaskId>);

/// What the scheduler, the delivery worker and the API need of a store. One gateway uses
/// [`RedbStore`]; several replicas need a shared one (Redis Streams), behind the same trait.
pub trait TaskStore: Send + Sync + 'static {
    /// Writes whole records (insert or replace); durable when the future resolves. Writes are
    /// applied in the order `put` is called, whether or not their futures are awaited: the
    /// scheduler relies on it to mark a task running without waiting for the mark.
    fn put(&self, tasks: Vec<Task>) -> BoxFuture<'static, Result<(), StoreError>>;
    /// One task of the key `key_id` (`None` when the key has no task with this id).
    fn get(&self, key_id: &str, id: TaskId) -> BoxFuture<'static, Result<Option<Task>, StoreError>>;
    /// A key's tasks, oldest first, after `after`, with `status` if given: at most `limit`, and
    /// the cursor to continue from when more may follow.
    fn list(
        &self,
        key_id: &str,
        after: Option<TaskId>,
        status: Option<TaskStatus>,
        limit: usize,
    ) -> BoxFuture<'static, Result<Page, StoreError>>;
    /// Hands `each` every task that still has work to do (to run, or a webhook to deliver), in
    /// id order: what a restart picks up. One at a time, so a backlog of millions is never in
    /// memory whole. Returns how many. A shared store answers 0: its open tasks are taken by
    /// claims (see [`super::fleet`]), not loaded by one replica.
    fn open_tasks(&self, each: &mut dyn FnMut(Task)) -> Result<usize, StoreError>;
    /// Deletes finished tasks whose retention ended by `now_ms`; returns how many.
    fn expire(&self, now_ms: u64) -> BoxFuture<'static, Result<usize, StoreError>>;
}

const TASKS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("tasks");
/// `key id, 0xFF, task id` → (): a key's tasks in submission order.
const BY_KEY: TableDefinition<&[u8], ()> = TableDefinition::new("tasks_by_key");
/// Task ids with work left.
const OPEN: TableDefinition<&[u8], ()> = TableDefinition::new("open_tasks");
/// `expiry ms (big-endian), task id` → ().
const EXPIRY: TableDefinition<&[u8], ()> = TableDefinition::new("task_expiry");

/// The store's page cache. redb's default (1 GiB) would make a gateway's memory grow with its
/// backlog; recent tasks, the ones read back, fit in far less.
const CACHE_BYTES: usize = 64 << 20;

/// Most rows one page of [`TaskStore::list`] looks at, so a filter matching few tasks of a key
/// with a million still answers quickly (the cursor lets the client go on).
const MAX_SCAN: usize = 10_000;

fn key_prefix(key_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(key_id.len() + 17);
    k.extend_from_slice(key_id.as_bytes());
    k.push(0xFF);
    k
}

enum Op {
    Put(Vec<Task>, oneshot::Sender<Result<(), String>>),
    Expire(u64, oneshot::Sender<Result<usize, String>>),
}

/// The embedded store: one redb file under the gateway's `--data-dir`.
pub struct RedbStore {
    db: Arc<Database>,
    writer: mpsc::Sender<Op>,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore").finish_non_exhaustive()
    }
}

impl RedbStore {
    /// Opens (or creates) `dir/tasks.redb` and starts its writer thread.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| db(redb::StorageError::Io(e)))?;
        let database = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(dir.join("tasks.redb"))
            .map_err(db)?;
        let txn = database.begin_write().map_err(db)?;
        {
            txn.open_table(TASKS).map_err(db)?;
            txn.open_table(BY_KEY).map_err(db)?;
            txn.open_table(OPEN).map_err(db)?;
            txn.open_table(EXPIRY).map_err(db)?;
        }
        txn.commit().map_err(db)?;
        let database = Arc::new(database);
        let (tx, rx) = mpsc::channel();
        let writer_db = Arc::clone(&database);
        std::thread::Builder::new()
            .name("slotgate-task-store".into())
            .spawn(move || writer(&writer_db, &rx))
            .map_err(|e| db(redb::StorageError::Io(e)))?;
        Ok(Self {
            db: database,
            writer: tx,
        })
    }
}

/// Commits every operation queued since the last commit in one transaction.
fn writer(database: &Database, rx: &mpsc::Receiver<Op>) {
    while let Ok(first) = rx.recv() {
        let mut ops = vec![first];
        while ops.len() < 8192 {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        let result = commit(database, &mut ops);
        for op in ops {
            match (op, &result) {
                (Op::Put(_, done), Ok(_)) => {
                    let _ = done.send(Ok(()));
                }
                (Op::Expire(_, done), Ok(counts)) => {
                    let _ = done.send(Ok(counts.pop_expired()));
                }
                (Op::Put(_, done), Err(e)) => {
                    let _ = done.send(Err(e.to_string()));
                }
                (Op::Expire(_, done), Err(e)) => {
                    let _ = done.send(Err(e.to_string()));
                }
            }
        }
    }
}

/// How many tasks each expiry operation of a commit deleted, in order.
struct Expired(std::cell::RefCell<std::collections::VecDeque<usize>>);

impl Expired {
    fn pop_expired(&self) -> usize {
        self.0.borrow_mut().pop_front().unwrap_or(0)
    }
}

fn commit(database: &Database, ops: &mut [Op]) -> Result<Expired, StoreError> {
    let txn = database.begin_write().map_err(db)?;
    let expired = Expired(Default::default());
    {
        let mut tasks = txn.open_table(TASKS).map_err(db)?;
        let mut by_key = txn.open_table(BY_KEY).map_err(db)?;
        let mut open = txn.open_table(OPEN).map_err(db)?;
        let mut expiry = txn.open_table(EXPIRY).map_err(db)?;
        for op in ops.iter_mut() {
            match op {
                Op::Put(batch, _) => {
                    for task in batch.drain(..) {
                        let id = task.id.to_bytes();
                        let json = serde_json::to_vec(&task).expect("a task serialises");
                        tasks.insert(id.as_slice(), json.as_slice()).map_err(db)?;
                        let mut k = key_prefix(&task.key_id);
                        k.extend_from_slice(&id);
                        by_key.insert(k.as_slice(), ()).map_err(db)?;
                        if task.is_open() {
                            open.insert(id.as_slice(), ()).map_err(db)?;
                        } else {
                            open.remove(id.as_slice()).map_err(db)?;
                        }
                        if let Some(at) = task.expires_at {
                            let mut k = at.to_be_bytes().to_vec();
                            k.extend_from_slice(&id);
                            expiry.insert(k.as_slice(), ()).map_err(db)?;
                        }
                    }
                }
                Op::Expire(now, _) => {
                    let end = (*now + 1).to_be_bytes();
                    let due: Vec<Vec<u8>> = expiry
                        .range(..end.as_slice())
                        .map_err(db)?
                        .take(100_000)
                        .map(|r| r.map(|(k, _)| k.value().to_vec()).map_err(db))
                        .collect::<Result<_, _>>()?;
                    let mut n = 0;
                    for k in due {
                        expiry.remove(k.as_slice()).map_err(db)?;
                        let id = &k[8..];
                        let record = tasks.remove(id).map_err(db)?.map(|v| v.value().to_vec());
                        if let Some(bytes) = record
                            && let Ok(task) = serde_json::from_slice::<Task>(&bytes)
                        {
                            let mut bk = key_prefix(&task.key_id);
                            bk.extend_from_slice(id);
                            by_key.remove(bk.as_slice()).map_err(db)?;
                            open.remove(id).map_err(db)?;
                            n += 1;
                        }
                    }
                    expired.0.borrow_mut().push_back(n);
                }
            }
        }
    }
    txn.commit().map_err(db)?;
    Ok(expired)
}

fn decode(id: &[u8], bytes: &[u8]) -> Result<Task, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Decode {
        id: TaskId::from_bytes(id).map_or_else(|| hex::encode(id), |t| t.to_string()),
        source,
    })
}

impl TaskStore for RedbStore {
    fn put(&self, tasks: Vec<Task>) -> BoxFuture<'static, Result<(), StoreError>> {
        let (tx, rx) = oneshot::channel();
        let sent = self.writer.send(Op::Put(tasks, tx));
        Box::pin(async move {
            sent.map_err(|_| StoreError::Closed)?;
            match rx.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(db(redb::StorageError::Io(std::io::Error::other(e)))),
                Err(_) => Err(StoreError::Closed),
            }
        })
    }

    fn get(&self, key_id: &str, id: TaskId) -> BoxFuture<'static, Result<Option<Task>, StoreError>> {
        let found = self.get_now(id).map(|t| t.filter(|t| t.key_id == key_id));
        Box::pin(std::future::ready(found))
    }

    fn list(
        &self,
        key_id: &str,
        after: Option<TaskId>,
        status: Option<TaskStatus>,
        limit: usize,
    ) -> BoxFuture<'static, Result<Page, StoreError>> {
        Box::pin(std::future::ready(self.list_now(key_id, after, status, limit)))
    }

    fn open_tasks(&self, each: &mut dyn FnMut(Task)) -> Result<usize, StoreError> {
        let txn = self.db.begin_read().map_err(db)?;
        let open = txn.open_table(OPEN).map_err(db)?;
        let tasks = txn.open_table(TASKS).map_err(db)?;
        let mut n = 0;
        for row in open.iter().map_err(db)? {
            let (k, _) = row.map_err(db)?;
            if let Some(v) = tasks.get(k.value()).map_err(db)? {
                each(decode(k.value(), v.value())?);
                n += 1;
            }
        }
        Ok(n)
    }

    fn expire(&self, now_ms: u64) -> BoxFuture<'static, Result<usize, StoreError>> {
        let (tx, rx) = oneshot::channel();
        let sent = self.writer.send(Op::Expire(now_ms, tx));
        Box::pin(async move {
            sent.map_err(|_| StoreError::Closed)?;
            match rx.await {
                Ok(Ok(n)) => Ok(n),
                Ok(Err(e)) => Err(db(redb::StorageError::Io(std::io::Error::other(e)))),
                Err(_) => Err(StoreError::Closed),
            }
        })
    }
}

impl RedbStore {
    // Reads are short redb read transactions: answered on the caller's thread.
    fn get_now(&self, id: TaskId) -> Result<Option<Task>, StoreError> {
        let txn = self.db.begin_read().map_err(db)?;
        let tasks = txn.open_table(TASKS).map_err(db)?;
        let key = id.to_bytes();
        match tasks.get(key.as_slice()).map_err(db)? {
            Some(v) => decode(&key, v.value()).map(Some),
            None => Ok(None),
        }
    }

    fn list_now(
        &self,
        key_id: &str,
        after: Option<TaskId>,
        status: Option<TaskStatus>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let txn = self.db.begin_read().map_err(db)?;
        let by_key = txn.open_table(BY_KEY).map_err(db)?;
        let tasks = txn.open_table(TASKS).map_err(db)?;
        let prefix = key_prefix(key_id);
        let mut start = prefix.clone();
        if let Some(a) = after {
            // Just past the cursor: its own id followed by the smallest suffix.
            start.extend_from_slice(&a.to_bytes());
            start.push(0);
        }
        let mut out = Vec::new();
        let mut last = None;
        // UTF-8 never holds 0xFF, so the prefix names this key alone.
        for (scanned, row) in by_key.range(start.as_slice()..).map_err(db)?.enumerate() {
            let (k, _) = row.map_err(db)?;
            let k = k.value();
            let Some(rest) = k.strip_prefix(prefix.as_slice()) else {
                break;
            };
            let Some(id) = TaskId::from_bytes(rest) else {
                continue;
            };
            if scanned >= MAX_SCAN || out.len() >= limit {
                return Ok((out, last));
            }
            last = Some(id);
            let key = id.to_bytes();
            if let Some(v) = tasks.get(key.as_slice()).map_err(db)? {
                let task = decode(&key, v.value())?;
                if status.is_none_or(|s| s == task.status) {
                    out.push(task);
                }
            }
        }
        Ok((out, None))
    }
}
