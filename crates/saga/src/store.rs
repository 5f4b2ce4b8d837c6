//! The saga tables (see `migrations/`): instances, sent commands,
//! transitions. Times are microseconds since the epoch.

use skein_contracts::orchestrator::{SagaStatus, SagaTransition, SentMessage};
use skein_outbox::{Backend, Statements};
use sqlx::{AnyConnection, Row};
use uuid::Uuid;

use crate::engine::{Finish, Instance, Phase};

const COLUMNS: &str = "id, saga, saga_key, status, step, attempt, compensations, finish, data, \
                       reason, correlation_id, deadline_at, version, created_at, updated_at";

/// [`COLUMNS`] of `saga_instances` aliased `i`, for joins.
const INSTANCE_COLUMNS: &str = "i.id, i.saga, i.saga_key, i.status, i.step, i.attempt, \
                                i.compensations, i.finish, i.data, i.reason, i.correlation_id, \
                                i.deadline_at, i.version, i.created_at, i.updated_at";

fn decode_error(what: impl std::fmt::Display) -> sqlx::Error {
    sqlx::Error::Decode(what.to_string().into())
}

fn to_index(value: i64) -> sqlx::Result<usize> {
    usize::try_from(value).map_err(decode_error)
}

fn to_instance(row: &sqlx::any::AnyRow) -> sqlx::Result<Instance> {
    let id: String = row.try_get("id")?;
    let status: String = row.try_get("status")?;
    let compensations: String = row.try_get("compensations")?;
    let finish: String = row.try_get("finish")?;
    let data: String = row.try_get("data")?;
    let attempt: i64 = row.try_get("attempt")?;
    Ok(Instance {
        id: Uuid::parse_str(&id).map_err(decode_error)?,
        saga: row.try_get("saga")?,
        key: row.try_get("saga_key")?,
        status: SagaStatus::parse(&status)
            .ok_or_else(|| decode_error(format!("unknown saga status {status:?}")))?,
        step: to_index(row.try_get("step")?)?,
        attempt: u32::try_from(attempt).map_err(decode_error)?,
        compensations: serde_json::from_str(&compensations).map_err(decode_error)?,
        finish: serde_json::from_value(serde_json::Value::String(finish)).map_err(decode_error)?,
        data: serde_json::from_str(&data).map_err(decode_error)?,
        reason: row.try_get("reason")?,
        correlation_id: row.try_get("correlation_id")?,
        deadline_at: row.try_get("deadline_at")?,
        version: row.try_get("version")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn finish_name(finish: Finish) -> &'static str {
    match finish {
        Finish::Failure => "failure",
        Finish::Cancel => "cancel",
    }
}

fn compensations_json(inst: &Instance) -> String {
    serde_json::to_string(&inst.compensations).unwrap_or_else(|_| "[]".into())
}

fn step_value(inst: &Instance) -> i64 {
    i64::try_from(inst.step).unwrap_or(i64::MAX)
}

/// Inserts a new instance unless one exists for its saga and key; `false`
/// when one did.
pub(crate) async fn insert(conn: &mut AnyConnection, inst: &Instance) -> sqlx::Result<bool> {
    let done = sqlx::query(&format!(
        "INSERT INTO saga_instances ({COLUMNS}) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) \
         ON CONFLICT (saga, saga_key) DO NOTHING"
    ))
    .bind(inst.id.to_string())
    .bind(&inst.saga)
    .bind(&inst.key)
    .bind(inst.status.as_str())
    .bind(step_value(inst))
    .bind(i64::from(inst.attempt))
    .bind(compensations_json(inst))
    .bind(finish_name(inst.finish))
    .bind(inst.data.to_string())
    .bind(inst.reason.clone())
    .bind(&inst.correlation_id)
    .bind(inst.deadline_at)
    .bind(inst.version)
    .bind(inst.created_at)
    .bind(inst.updated_at)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Adds to `writes` the update that stores `inst` (already at its new
/// version) if the stored one is still at `expected`. It returns one row
/// (the new version) when it did, none when another change got there first.
pub(crate) fn push_update(writes: &mut Statements, inst: &Instance, expected: i64) {
    writes.push_returning(
        "UPDATE saga_instances SET status = $1, step = $2, attempt = $3, compensations = $4, \
         finish = $5, data = $6, reason = $7, deadline_at = $8, version = $9, updated_at = $10 \
         WHERE id = $11 AND version = $12 RETURNING version",
        |b| {
            b.bind(inst.status.as_str())
                .bind(step_value(inst))
                .bind(i64::from(inst.attempt))
                .bind(compensations_json(inst))
                .bind(finish_name(inst.finish))
                .bind(inst.data.to_string())
                .bind(inst.reason.clone())
                .bind(inst.deadline_at)
                .bind(inst.version)
                .bind(inst.updated_at)
                .bind(inst.id.to_string())
                .bind(expected);
        },
    );
}

/// The instance `id`.
pub(crate) async fn load(conn: &mut AnyConnection, id: Uuid) -> sqlx::Result<Option<Instance>> {
    sqlx::query(&format!(
        "SELECT {COLUMNS} FROM saga_instances WHERE id = $1"
    ))
    .bind(id.to_string())
    .fetch_optional(conn)
    .await?
    .map(|r| to_instance(&r))
    .transpose()
}

/// The instance of `saga` about `key`.
pub(crate) async fn load_by_key(
    conn: &mut AnyConnection,
    saga: &str,
    key: &str,
) -> sqlx::Result<Option<Instance>> {
    sqlx::query(&format!(
        "SELECT {COLUMNS} FROM saga_instances WHERE saga = $1 AND saga_key = $2"
    ))
    .bind(saga)
    .bind(key)
    .fetch_optional(conn)
    .await?
    .map(|r| to_instance(&r))
    .transpose()
}

/// Live instances whose deadline is at or before `now`, earliest first (by
/// deadline, then id), after `after` (a page's last), with their deadlines.
pub(crate) async fn due(
    conn: &mut AnyConnection,
    sagas: &[&str],
    now: i64,
    after: Option<(i64, Uuid)>,
    limit: i64,
) -> sqlx::Result<Vec<(Uuid, i64)>> {
    if sagas.is_empty() {
        return Ok(Vec::new());
    }
    // Only the sagas this coordinator knows: another version's are left to
    // the copies that know them, and take no place in the batch.
    let names = (0..sagas.len())
        .map(|i| format!("${}", i + 5))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "SELECT id, deadline_at FROM saga_instances WHERE deadline_at <= $1 \
         AND status IN ('running', 'compensating') AND saga IN ({names}) \
         AND (deadline_at > $3 OR (deadline_at = $3 AND id > $4)) \
         ORDER BY deadline_at, id LIMIT $2"
    );
    let (after_at, after_id) =
        after.map_or((i64::MIN, String::new()), |(at, id)| (at, id.to_string()));
    let mut query = sqlx::query(&sql)
        .bind(now)
        .bind(limit)
        .bind(after_at)
        .bind(after_id);
    for saga in sagas {
        query = query.bind(*saga);
    }
    let rows = query.fetch_all(conn).await?;
    rows.iter()
        .map(|r| {
            let id: String = r.try_get("id")?;
            let at: i64 = r.try_get("deadline_at")?;
            Uuid::parse_str(&id)
                .map(|id| (id, at))
                .map_err(decode_error)
        })
        .collect()
}

/// Instances, newest first, optionally of one status or key, after `cursor`
/// (an instance id: UUIDv7 ids sort by creation).
pub(crate) async fn list(
    conn: &mut AnyConnection,
    status: Option<SagaStatus>,
    key: Option<&str>,
    before: Option<Uuid>,
    limit: i64,
) -> sqlx::Result<Vec<Instance>> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM saga_instances \
         WHERE ($1 IS NULL OR status = $1) AND ($2 IS NULL OR saga_key = $2) AND ($3 IS NULL OR id < $3) \
         ORDER BY id DESC LIMIT $4"
    ))
    .bind(status.map(SagaStatus::as_str))
    .bind(key)
    .bind(before.map(|b| b.to_string()))
    .bind(limit)
    .fetch_all(conn)
    .await?;
    rows.iter().map(to_instance).collect()
}

/// Live instances past their deadline by `min_overdue` or more, most
/// overdue first, then failed ones.
pub(crate) async fn stuck(
    conn: &mut AnyConnection,
    now: i64,
    min_overdue: i64,
    limit: i64,
) -> sqlx::Result<Vec<Instance>> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM saga_instances \
         WHERE (status IN ('running', 'compensating') AND deadline_at <= $1) OR status = 'failed' \
         ORDER BY CASE WHEN status = 'failed' THEN 1 ELSE 0 END, \
         CASE WHEN deadline_at IS NULL THEN 1 ELSE 0 END, deadline_at, id LIMIT $2"
    ))
    .bind(now.saturating_sub(min_overdue))
    .bind(limit)
    .fetch_all(conn)
    .await?;
    rows.iter().map(to_instance).collect()
}

/// Adds to `writes` the records of commands `instance` sends, so that
/// their replies find it: (message id, kind, step, phase) each.
pub(crate) fn push_sent(
    writes: &mut Statements,
    instance: Uuid,
    sends: &[(Uuid, &str, usize, Phase)],
    now: i64,
) {
    if sends.is_empty() {
        return;
    }
    let mut sql = String::from(
        "INSERT INTO saga_sent (message_id, instance_id, step, phase, kind, sent_at) VALUES ",
    );
    for i in 0..sends.len() {
        let n = i * 6;
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&format!(
            "(${}, ${}, ${}, ${}, ${}, ${})",
            n + 1,
            n + 2,
            n + 3,
            n + 4,
            n + 5,
            n + 6
        ));
    }
    writes.push(&sql, |b| {
        for (id, kind, step, phase) in sends {
            b.bind(id.to_string())
                .bind(instance.to_string())
                .bind(i64::try_from(*step).unwrap_or(i64::MAX))
                .bind(phase.as_str())
                .bind((*kind).to_owned())
                .bind(now);
        }
    });
}

/// The command `message_id`, if a saga sent it: the step and phase it
/// belongs to, and its instance (`Err` naming the instance when the
/// instance is gone). One statement: a reply is the orchestrator's most
/// common input.
pub(crate) async fn sent_by(
    conn: &mut AnyConnection,
    message_id: Uuid,
) -> sqlx::Result<Option<(Result<Instance, Uuid>, usize, Phase)>> {
    let Some(row) = sqlx::query(&format!(
        "SELECT s.instance_id AS sent_instance, s.step AS sent_step, s.phase AS sent_phase, \
         {INSTANCE_COLUMNS} FROM saga_sent s LEFT JOIN saga_instances i ON i.id = s.instance_id \
         WHERE s.message_id = $1"
    ))
    .bind(message_id.to_string())
    .fetch_optional(conn)
    .await?
    else {
        return Ok(None);
    };
    let phase = phase_at(&row, "sent_phase")?;
    let step = to_index(row.try_get("sent_step")?)?;
    let instance = if row.try_get::<Option<String>, _>("id")?.is_some() {
        Ok(to_instance(&row)?)
    } else {
        let id: String = row.try_get("sent_instance")?;
        Err(Uuid::parse_str(&id).map_err(decode_error)?)
    };
    Ok(Some((instance, step, phase)))
}

/// Whether instance `instance` sent a command at `step` in `phase`.
pub(crate) async fn sent_in(
    conn: &mut AnyConnection,
    instance: Uuid,
    step: usize,
    phase: Phase,
) -> sqlx::Result<bool> {
    let found: Option<String> = sqlx::query_scalar(
        "SELECT message_id FROM saga_sent WHERE instance_id = $1 AND step = $2 AND phase = $3 \
         LIMIT 1",
    )
    .bind(instance.to_string())
    .bind(i64::try_from(step).unwrap_or(i64::MAX))
    .bind(phase.as_str())
    .fetch_optional(conn)
    .await?;
    Ok(found.is_some())
}

/// The phase in `row`'s column `column`.
fn phase_at(row: &sqlx::any::AnyRow, column: &str) -> sqlx::Result<Phase> {
    let phase: String = row.try_get(column)?;
    Phase::parse(&phase).ok_or_else(|| decode_error(format!("unknown phase {phase:?}")))
}

/// One transition to record.
#[derive(Debug)]
pub(crate) struct NewTransition<'a> {
    pub(crate) instance: Uuid,
    pub(crate) from: Option<SagaStatus>,
    pub(crate) to: SagaStatus,
    pub(crate) step: Option<&'a str>,
    pub(crate) cause_id: Option<Uuid>,
    pub(crate) cause: &'a str,
    pub(crate) sent: &'a [SentMessage],
    pub(crate) note: &'a str,
    pub(crate) at: i64,
    /// Recorded only if the instance is still there: set when the same
    /// writes neither insert the instance nor update it (a note about an
    /// input that changed nothing), whose version check would otherwise
    /// find a deleted one.
    pub(crate) if_kept: bool,
}

/// Adds to `writes` a transition appended to its instance's history.
pub(crate) fn push_transition(writes: &mut Statements, t: &NewTransition<'_>) {
    // The next number in the instance's history, computed in the insert.
    // Writers that change the instance are serialised by its version check
    // before this; any other collision violates the primary key and the
    // transaction is retried.
    const COLUMNS: &str =
        "INSERT INTO saga_transitions (instance_id, seq, at, from_status, to_status, step, cause_id, cause, sent, note)";
    const VALUES: &str =
        "$1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM saga_transitions WHERE instance_id = $1), \
         $2, $3, $4, $5, $6, $7, $8, $9";
    let sql = if !t.if_kept {
        format!("{COLUMNS} VALUES ({VALUES})")
    } else {
        // Pruning deletes an instance that ended and then its transitions.
        // On PostgreSQL a note about such an instance, inserted between the
        // two and committed after, would be left with no instance: the
        // key-share lock waits for a delete in progress and then finds
        // nothing to record against (and a delete that comes second waits
        // for this transaction and then deletes the note too). SQLite has
        // one writer at a time.
        let lock = match writes.backend() {
            Backend::Postgres => " FOR KEY SHARE",
            Backend::Sqlite => "",
        };
        format!("{COLUMNS} SELECT {VALUES} FROM saga_instances WHERE id = $1{lock}")
    };
    writes.push(&sql, |b| {
        b.bind(t.instance.to_string())
            .bind(t.at)
            .bind(t.from.map(SagaStatus::as_str))
            .bind(t.to.as_str())
            .bind(t.step.map(str::to_owned))
            .bind(t.cause_id.map(|c| c.to_string()))
            .bind(t.cause.to_owned())
            .bind(serde_json::to_string(t.sent).unwrap_or_else(|_| "[]".into()))
            .bind(t.note.to_owned());
    });
}

/// Every transition of `instance`, oldest first.
pub(crate) async fn transitions(
    conn: &mut AnyConnection,
    instance: Uuid,
) -> sqlx::Result<Vec<SagaTransition>> {
    let rows = sqlx::query(
        "SELECT seq, at, from_status, to_status, step, cause_id, cause, sent, note \
         FROM saga_transitions WHERE instance_id = $1 ORDER BY seq",
    )
    .bind(instance.to_string())
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|r| {
            let from: Option<String> = r.try_get("from_status")?;
            let to: String = r.try_get("to_status")?;
            let cause_id: Option<String> = r.try_get("cause_id")?;
            let sent: String = r.try_get("sent")?;
            Ok(SagaTransition {
                seq: r.try_get("seq")?,
                at: crate::rfc3339(r.try_get("at")?),
                from: from.as_deref().and_then(SagaStatus::parse),
                to: SagaStatus::parse(&to)
                    .ok_or_else(|| decode_error(format!("unknown status {to:?}")))?,
                step: r.try_get("step")?,
                cause_id: cause_id
                    .as_deref()
                    .map(Uuid::parse_str)
                    .transpose()
                    .map_err(decode_error)?,
                cause: r.try_get("cause")?,
                sent: serde_json::from_str(&sent).map_err(decode_error)?,
                note: r.try_get("note")?,
            })
        })
        .collect()
}

/// Deletes up to `limit` instances that ended (`completed` or
/// `compensated`: nothing changes them any more) before `before`, with the
/// records of the commands they sent and their transitions; returns the
/// instances' ids. A reply that comes after finds no record of its command
/// and changes nothing, as a reply to an ended instance did before.
///
/// Instance ids are UUIDv7s, which sort by creation: an instance that ended
/// before `before` was created before it, so only the `(status, id)` index
/// range of instances older than `before` is read, however many younger
/// ones the table holds.
pub(crate) async fn prune(
    conn: &mut AnyConnection,
    before: i64,
    limit: i64,
) -> sqlx::Result<Vec<String>> {
    let millis = u64::try_from(before.div_euclid(1000)).unwrap_or(0);
    let created_before = uuid::Builder::from_unix_timestamp_millis(millis, &[0; 10])
        .into_uuid()
        .to_string();
    let ids: Vec<String> = sqlx::query_scalar(
        "DELETE FROM saga_instances WHERE id IN (SELECT id FROM saga_instances \
         WHERE status IN ('completed', 'compensated') AND id < $1 AND updated_at < $2 LIMIT $3) \
         RETURNING id",
    )
    .bind(created_before)
    .bind(before)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    if ids.is_empty() {
        return Ok(ids);
    }
    let list = (1..=ids.len())
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ");
    for table in ["saga_sent", "saga_transitions"] {
        let sql = format!("DELETE FROM {table} WHERE instance_id IN ({list})");
        let mut query = sqlx::query(&sql);
        for id in &ids {
            query = query.bind(id);
        }
        query.execute(&mut *conn).await?;
    }
    Ok(ids)
}
