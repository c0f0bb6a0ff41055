//! One test suite for both task stores behind `TaskStore`: the embedded store (redb on disk) and
//! the shared one (a real Redis), so a gateway behaves the same whichever it runs on. Then the
//! shared store's claims, which only it has.

mod common;

use std::{sync::Arc, time::Duration};

use common::Redis;
use slotgate::tasks::{
    RedbStore, Task, TaskId, TaskStatus, TaskStore,
    model::{DeliveryStatus, Webhook, unix_ms_now},
    redis_store::RedisStore,
};

fn task(key: &str, at: u64) -> Task {
    Task::queued(
        TaskId::new(at),
        key,
        &[0; 32],
        "CHATGPT".into(),
        serde_json::json!({"prompt": "hi"}),
        None,
    )
}

fn ids(tasks: &[Task]) -> Vec<TaskId> {
    tasks.iter().map(|t| t.id).collect()
}

/// What every store must do.
async fn suite(store: Arc<dyn TaskStore>) {
    let base = unix_ms_now();
    let a: Vec<Task> = (0..5).map(|i| task("ns/a", base + i)).collect();
    let b = task("ns/b", base);
    let mut all = a.clone();
    all.push(b.clone());
    store.put(all).await.unwrap();

    // Records come back whole, and only to their key.
    assert_eq!(store.get("ns/a", a[3].id).await.unwrap(), Some(a[3].clone()));
    assert_eq!(store.get("ns/b", a[3].id).await.unwrap(), None);
    assert_eq!(store.get("ns/a", TaskId::new(base)).await.unwrap(), None);

    let retention_end = base + 60_000;
    let mut done = a[1].clone();
    done.status = TaskStatus::Completed;
    done.response = Some(serde_json::json!({"text": "ok"}));
    done.finished_at = Some(base + 10);
    done.expires_at = Some(retention_end);
    store.put(vec![done.clone()]).await.unwrap();
    assert_eq!(store.get("ns/a", done.id).await.unwrap(), Some(done.clone()));

    // Pages in submission order, with a cursor; a status filter.
    let (page, cursor) = store.list("ns/a", None, None, 2).await.unwrap();
    assert_eq!(ids(&page), vec![a[0].id, a[1].id]);
    assert_eq!(page[1].status, TaskStatus::Completed);
    let (rest, end) = store.list("ns/a", cursor, None, 10).await.unwrap();
    assert_eq!(ids(&rest), vec![a[2].id, a[3].id, a[4].id]);
    assert_eq!(end, None);
    let (queued, _) = store
        .list("ns/a", None, Some(TaskStatus::Queued), 10)
        .await
        .unwrap();
    assert_eq!(queued.len(), 4);
    let (completed, _) = store
        .list("ns/a", None, Some(TaskStatus::Completed), 10)
        .await
        .unwrap();
    assert_eq!(ids(&completed), vec![done.id]);
    assert_eq!(
        ids(&store.list("ns/b", None, None, 10).await.unwrap().0),
        vec![b.id]
    );

    // Writes apply in call order even when the first is not awaited before the second is made.
    let mut running = a[2].clone();
    running.status = TaskStatus::Running;
    running.attempts = 1;
    let mut finished = running.clone();
    finished.status = TaskStatus::Failed;
    finished.expires_at = Some(retention_end + 1);
    let first = store.put(vec![running]);
    let second = store.put(vec![finished.clone()]);
    let (r1, r2) = tokio::join!(second, first);
    r1.unwrap();
    r2.unwrap();
    assert_eq!(
        store.get("ns/a", finished.id).await.unwrap(),
        Some(finished.clone())
    );

    // Retention: nothing before its end, the finished tasks at it; the rest stay.
    assert_eq!(store.expire(retention_end - 1).await.unwrap(), 0);
    assert_eq!(store.expire(retention_end + 1).await.unwrap(), 2);
    assert_eq!(store.get("ns/a", done.id).await.unwrap(), None);
    assert_eq!(store.get("ns/a", finished.id).await.unwrap(), None);
    assert_eq!(
        ids(&store.list("ns/a", None, None, 10).await.unwrap().0),
        vec![a[0].id, a[3].id, a[4].id]
    );
    assert_eq!(store.expire(retention_end + 1).await.unwrap(), 0);
}

#[tokio::test]
async fn the_embedded_store_passes_the_suite() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    // Its restart view: the unfinished tasks (a finished one with a pending webhook too).
    let mut t = task("ns/c", unix_ms_now());
    t.status = TaskStatus::Completed;
    t.webhook = Some(Webhook {
        url: "http://127.0.0.1:1/".into(),
        status: DeliveryStatus::Pending,
        attempts: vec![],
        next_attempt_at: None,
    });
    store.put(vec![t.clone()]).await.unwrap();
    assert_eq!(store.open_tasks(&mut |_| {}).unwrap(), 1);
    t.webhook.as_mut().unwrap().status = DeliveryStatus::Delivered;
    store.put(vec![t]).await.unwrap();
    assert_eq!(store.open_tasks(&mut |_| {}).unwrap(), 0);
    suite(Arc::new(store)).await;
}

fn redis_store(redis: &Redis, prefix: &str) -> RedisStore {
    RedisStore::connect(
        &format!("redis://127.0.0.1:{}", redis.port),
        prefix,
        Duration::from_secs(2),
    )
    .unwrap()
}

#[tokio::test]
async fn the_redis_store_passes_the_suite() {
    let redis = Redis::start();
    suite(Arc::new(redis_store(&redis, "suite"))).await;
}

#[tokio::test]
async fn claims_are_fleet_wide_kept_by_their_holder_and_taken_over_when_it_stops() {
    let redis = Redis::start();
    let store = redis_store(&redis, "claims");
    let key = "ns/k";
    let tasks: Vec<Task> = (0..3).map(|i| task(key, unix_ms_now() + i)).collect();
    // The cap counts unfinished tasks across replicas: the third of a cap of 2 is refused.
    assert_eq!(store.submit(&tasks[0], 2).await.unwrap(), Ok(()));
    assert_eq!(store.submit(&tasks[1], 2).await.unwrap(), Ok(()));
    assert_eq!(store.submit(&tasks[2], 2).await.unwrap(), Err(2));
    assert_eq!(
        store.get(key, tasks[2].id).await.unwrap(),
        None,
        "a refused task is not stored"
    );
    assert_eq!(store.active_keys().await.unwrap(), vec![key.to_string()]);

    let idle = Duration::from_millis(300);
    let (mut ca, mut cb) = ("0-0".to_string(), "0-0".to_string());
    // Two replicas claim: each gets a different task, a third claim finds nothing.
    let first = store.claim(key, "a", idle, &mut ca).await.unwrap().unwrap();
    let second = store.claim(key, "b", idle, &mut cb).await.unwrap().unwrap();
    assert_ne!(first.task, second.task);
    assert!(store.claim(key, "b", idle, &mut cb).await.unwrap().is_none());

    // A kept claim is not taken over; one left idle is, and its old holder learns it lost it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(store.keep(key, "a", &[&first.entry]).await.unwrap().is_empty());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let taken = store.claim(key, "a", idle, &mut ca).await.unwrap().unwrap();
    assert_eq!(taken, second, "a's claim was kept, b's lapsed and went to a");
    assert_eq!(
        store.keep(key, "b", &[&second.entry]).await.unwrap(),
        vec![second.entry.clone()]
    );

    // Start and cancel are compare-and-set on the status: the loser sees the winner's.
    let mut started = store.get(key, first.task).await.unwrap().unwrap();
    started.status = TaskStatus::Running;
    assert_eq!(
        store.swap(&started, &[TaskStatus::Queued]).await.unwrap(),
        Some(TaskStatus::Queued)
    );
    let mut canceled = started.clone();
    canceled.status = TaskStatus::Canceled;
    canceled.expires_at = Some(unix_ms_now() + 60_000);
    assert_eq!(
        store.swap(&canceled, &[TaskStatus::Queued]).await.unwrap(),
        Some(TaskStatus::Running),
        "a running task is not canceled"
    );
    assert_eq!(
        store.get(key, first.task).await.unwrap().unwrap().status,
        TaskStatus::Running
    );

    // Finished: one slot of the cap frees, and once every entry is done the key leaves the set.
    let mut finished = started.clone();
    finished.status = TaskStatus::Completed;
    finished.expires_at = Some(unix_ms_now() + 60_000);
    store.put(vec![finished]).await.unwrap();
    assert_eq!(store.submit(&tasks[2], 2).await.unwrap(), Ok(()));
    store.done(key, &first.entry).await.unwrap();
    store.done(key, &second.entry).await.unwrap();
    assert_eq!(
        store.active_keys().await.unwrap(),
        vec![key.to_string()],
        "tasks[2] is queued"
    );
    let third = store.claim(key, "b", idle, &mut cb).await.unwrap().unwrap();
    assert_eq!(third.task, tasks[2].id);
    // A replica shutting down gives its claims back at once.
    store.release(key, "b", &[&third.entry]).await.unwrap();
    let again = store
        .claim(key, "a", Duration::from_secs(3600), &mut ca)
        .await
        .unwrap();
    assert_eq!(again.map(|c| c.task), Some(tasks[2].id));
    store.done(key, &third.entry).await.unwrap();
    assert!(store.active_keys().await.unwrap().is_empty());

    // A replica gone for good leaves its consumer in the group: once it holds nothing and has
    // been idle long enough, the others forget it (never themselves, never one holding work).
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(store.prune(key, "a", Duration::from_secs(3600)).await.unwrap(), 0);
    assert_eq!(
        store.prune(key, "a", Duration::from_millis(100)).await.unwrap(),
        1
    );
    let mut c = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let consumers: Vec<redis::Value> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(format!("claims:t:{{{key}}}:queue"))
        .arg("fleet")
        .query(&mut c)
        .unwrap();
    assert_eq!(consumers.len(), 1, "only a is left: {consumers:?}");
}
