//! A campaign's lifecycle without storage: its states, the actions that move it and which
//! move is allowed when ([`next_state`]), and the snapshot eligibility gets ([`projection`]).

use tessera_proto::eligibility::v1 as epb;
use tessera_proto::scheduler::v1 as pb;
use tessera_runtime::Error;
use tessera_runtime::error::Code;
use tessera_store::outbox::timestamp_to_micros;

use pb::CampaignState as State;

/// What moves a campaign from one state to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Start,
    Pause,
    Resume,
    Stop,
    Kill,
    /// The start job: its start time came.
    StartsAt,
    /// The end job: its end time came.
    EndsAt,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Start => "start",
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Stop => "stop",
            Action::Kill => "kill",
            Action::StartsAt => "starts_at",
            Action::EndsAt => "ends_at",
        }
    }
}

pub fn state_name(s: State) -> &'static str {
    match s {
        State::Unspecified => "unspecified",
        State::Draft => "draft",
        State::Scheduled => "scheduled",
        State::Active => "active",
        State::Paused => "paused",
        State::Killed => "killed",
        State::Ended => "ended",
    }
}

pub(crate) fn state_from(name: &str) -> State {
    match name {
        "draft" => State::Draft,
        "scheduled" => State::Scheduled,
        "active" => State::Active,
        "paused" => State::Paused,
        "killed" => State::Killed,
        "ended" => State::Ended,
        _ => State::Unspecified,
    }
}

pub(crate) fn starts_at(c: &pb::Campaign) -> Option<i64> {
    c.definition
        .as_ref()
        .and_then(|d| d.starts_at.as_ref())
        .map(timestamp_to_micros)
}

pub(crate) fn ends_at(c: &pb::Campaign) -> Option<i64> {
    c.definition
        .as_ref()
        .and_then(|d| d.ends_at.as_ref())
        .map(timestamp_to_micros)
}

/// The state an action leads to from `from` at `now`, or FAILED_PRECONDITION. Starting
/// (or resuming) a campaign whose start is ahead schedules it; a job acts only when its
/// time has come and the campaign is still waiting for it.
pub fn next_state(from: State, action: Action, c: &pb::Campaign, now: i64) -> Result<State, Error> {
    let waiting = starts_at(c).is_some_and(|s| s > now);
    let over = ends_at(c).is_some_and(|e| e <= now);
    let to = match (action, from) {
        (Action::Start, State::Draft) if over => None,
        (Action::Start, State::Draft) if waiting => Some(State::Scheduled),
        (Action::Start, State::Draft | State::Scheduled) => Some(State::Active),
        (Action::Pause, State::Active | State::Scheduled) => Some(State::Paused),
        (Action::Resume, State::Paused) if over => Some(State::Ended),
        (Action::Resume, State::Paused) if waiting => Some(State::Scheduled),
        (Action::Resume, State::Paused) => Some(State::Active),
        (Action::Stop, State::Scheduled | State::Active | State::Paused) => Some(State::Ended),
        (Action::Kill, State::Draft | State::Scheduled | State::Active | State::Paused) => {
            Some(State::Killed)
        }
        (Action::StartsAt, State::Scheduled) if !waiting => Some(State::Active),
        (Action::EndsAt, State::Scheduled | State::Active | State::Paused) if over => {
            Some(State::Ended)
        }
        _ => None,
    };
    to.ok_or_else(|| {
        let why = if action == Action::Start && from == State::Draft && over {
            "its end is in the past".to_string()
        } else {
            format!("it is {}", state_name(from))
        };
        Error::new(
            Code::FailedPrecondition,
            format!("cannot {} the campaign: {why}", action.as_str()),
        )
        .with_reason("ILLEGAL_TRANSITION")
    })
}

/// What eligibility gets: the definition with this campaign's id, name and status. An
/// ended campaign ends at the latest when it was stopped.
pub fn projection(c: &pb::Campaign) -> epb::Campaign {
    let mut d = c.definition.clone().unwrap_or_default();
    d.id = c.id.clone();
    d.name = c.name.clone();
    d.set_status(match c.state() {
        State::Paused => epb::CampaignStatus::Paused,
        State::Killed => epb::CampaignStatus::Disabled,
        _ => epb::CampaignStatus::Active,
    });
    // The codes of the pool it issues unlock it at checkout.
    if let Some(pool) = c.incentive.as_ref().map(|i| &i.pool_id)
        && !pool.is_empty()
        && !d.pool_ids.contains(pool)
    {
        d.pool_ids.push(pool.clone());
    }
    d
}

/// Eligibility names the fields of its campaign `campaign.…`; here it is the definition.
pub fn rename_fields(mut err: Error) -> Error {
    for fv in &mut err.field_violations {
        if let Some(rest) = fv.field.strip_prefix("campaign.") {
            fv.field = format!("campaign.definition.{rest}");
        }
    }
    err
}
