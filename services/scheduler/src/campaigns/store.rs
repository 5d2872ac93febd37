//! Campaign rows: read, listed, stored, and their state history.

use prost::Message;
use sea_orm::{ConnectionTrait, Value};
use tessera_proto::scheduler::v1 as pb;
use tessera_runtime::Error;
use tessera_store::outbox::micros_to_timestamp;
use tessera_store::{Backend, db_error, stmt};

use super::core::*;
use pb::CampaignState as State;

/// A stored campaign with its outputs filled in.
pub(crate) async fn load<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    id: &str,
    lock: bool,
) -> Result<Option<pb::Campaign>, Error> {
    let lock = if lock {
        Backend::of(conn).row_lock()
    } else {
        ""
    };
    let row = conn
        .query_one_raw(stmt(
            conn,
            &format!(
                "SELECT campaign, state, version, synced_version, created_at, updated_at \
                 FROM campaigns WHERE tenant_id = $1 AND id = $2{lock}"
            ),
            [tenant.into(), id.into()],
        ))
        .await
        .map_err(db_error)?;
    row.map(|row| decode(&row)).transpose()
}

pub(crate) fn decode(row: &sea_orm::QueryResult) -> Result<pb::Campaign, Error> {
    let bytes: Vec<u8> = row.try_get_by_index(0).map_err(db_error)?;
    let mut c = pb::Campaign::decode(bytes.as_slice()).map_err(Error::internal)?;
    let state: String = row.try_get_by_index(1).map_err(db_error)?;
    c.set_state(state_from(&state));
    c.version = row.try_get_by_index(2).map_err(db_error)?;
    c.synced_version = row.try_get_by_index(3).map_err(db_error)?;
    c.created_at = Some(micros_to_timestamp(
        row.try_get_by_index(4).map_err(db_error)?,
    ));
    c.updated_at = Some(micros_to_timestamp(
        row.try_get_by_index(5).map_err(db_error)?,
    ));
    Ok(c)
}

pub async fn get<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    id: &str,
) -> Result<pb::Campaign, Error> {
    load(conn, tenant, id, false)
        .await?
        .ok_or_else(|| Error::not_found(format!("campaign `{id}`")))
}

/// A page of campaigns by id.
pub async fn list<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    state: Option<State>,
    starting_after: &str,
    limit: u32,
) -> Result<(Vec<pb::Campaign>, bool), Error> {
    let mut values: Vec<Value> = vec![tenant.into(), starting_after.into()];
    let filter = match state {
        Some(s) => {
            values.push(state_name(s).into());
            " AND state = $4"
        }
        None => "",
    };
    values.insert(2, i64::from(limit + 1).into());
    let rows = conn
        .query_all_raw(stmt(
            conn,
            &format!(
                "SELECT campaign, state, version, synced_version, created_at, updated_at \
                 FROM campaigns WHERE tenant_id = $1 AND id > $2{filter} ORDER BY id LIMIT $3"
            ),
            values,
        ))
        .await
        .map_err(db_error)?;
    let mut out = rows.iter().map(decode).collect::<Result<Vec<_>, _>>()?;
    let more = out.len() > limit as usize;
    out.truncate(limit as usize);
    Ok((out, more))
}

/// The stored form: outputs cleared (they live in columns).
pub(crate) fn stored(c: &pb::Campaign) -> Vec<u8> {
    let mut c = c.clone();
    c.state = 0;
    c.version = 0;
    c.synced_version = 0;
    c.created_at = None;
    c.updated_at = None;
    c.encode_to_vec()
}

/// A campaign's history, oldest first.
pub async fn history<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    id: &str,
    after: i64,
    limit: u32,
) -> Result<(Vec<pb::Transition>, bool), Error> {
    let rows = conn
        .query_all_raw(stmt(
            conn,
            "SELECT seq, from_state, to_state, action, reason, principal, at \
             FROM campaign_transitions WHERE tenant_id = $1 AND campaign_id = $2 AND seq > $3 \
             ORDER BY seq LIMIT $4",
            [
                tenant.into(),
                id.into(),
                after.into(),
                i64::from(limit + 1).into(),
            ],
        ))
        .await
        .map_err(db_error)?;
    let mut out = Vec::new();
    for row in &rows {
        let text = |i| -> Result<String, Error> { row.try_get_by_index(i).map_err(db_error) };
        let mut t = pb::Transition {
            seq: row.try_get_by_index(0).map_err(db_error)?,
            action: text(3)?,
            reason: text(4)?,
            principal: text(5)?,
            at: Some(micros_to_timestamp(
                row.try_get_by_index(6).map_err(db_error)?,
            )),
            ..Default::default()
        };
        t.set_from(state_from(&text(1)?));
        t.set_to(state_from(&text(2)?));
        out.push(t);
    }
    let more = out.len() > limit as usize;
    out.truncate(limit as usize);
    Ok((out, more))
}
