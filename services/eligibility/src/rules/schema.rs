//! The declared shape of what a rule sees ([`Schema`]): the types of its variables and
//! fields, by scope, with the tenant's declared customer attributes.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

/// A static type of the rule language.
#[derive(Debug, Clone, PartialEq)]
pub enum Ty {
    Bool,
    Int,
    Uint,
    Double,
    String,
    Bytes,
    Null,
    Timestamp,
    Duration,
    List(Box<Ty>),
    Map(Box<Ty>, Box<Ty>),
    /// A record with known fields.
    Object(&'static str, Arc<BTreeMap<String, Ty>>),
    /// Known only at run time.
    Dyn,
}

impl Ty {
    pub(crate) fn list(t: Ty) -> Ty {
        Ty::List(Box::new(t))
    }

    pub(crate) fn map(k: Ty, v: Ty) -> Ty {
        Ty::Map(Box::new(k), Box::new(v))
    }

    pub(crate) fn object(name: &'static str, fields: Vec<(&str, Ty)>) -> Ty {
        Ty::Object(
            name,
            Arc::new(
                fields
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
            ),
        )
    }

    pub(crate) fn numeric(&self) -> bool {
        matches!(self, Ty::Int | Ty::Uint | Ty::Double | Ty::Dyn)
    }
}

impl fmt::Display for Ty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ty::Bool => f.write_str("bool"),
            Ty::Int => f.write_str("int"),
            Ty::Uint => f.write_str("uint"),
            Ty::Double => f.write_str("double"),
            Ty::String => f.write_str("string"),
            Ty::Bytes => f.write_str("bytes"),
            Ty::Null => f.write_str("null"),
            Ty::Timestamp => f.write_str("timestamp"),
            Ty::Duration => f.write_str("duration"),
            Ty::List(t) => write!(f, "list({t})"),
            Ty::Map(k, v) => write!(f, "map({k}, {v})"),
            Ty::Object(name, _) => f.write_str(name),
            Ty::Dyn => f.write_str("dyn"),
        }
    }
}

/// The type of a declared customer attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttrType {
    String,
    Number,
    Bool,
    Date,
    List,
}

impl AttrType {
    pub fn ty(self) -> Ty {
        match self {
            AttrType::String => Ty::String,
            AttrType::Number => Ty::Double,
            AttrType::Bool => Ty::Bool,
            AttrType::Date => Ty::Timestamp,
            AttrType::List => Ty::list(Ty::String),
        }
    }
}

/// Which variables a rule may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Segment rules: about the customer alone.
    Segment,
    /// Campaign rules: customer, order, event, segments, tier, now, campaign.
    Campaign,
}

/// The declared shape of the context, per tenant (its attributes).
#[derive(Debug, Clone)]
pub struct Schema {
    pub(crate) vars: BTreeMap<&'static str, Ty>,
}

impl Schema {
    pub fn new(attributes: &BTreeMap<String, AttrType>, scope: Scope) -> Self {
        let attrs = Ty::Object(
            "customer.attributes",
            Arc::new(
                attributes
                    .iter()
                    .map(|(k, t)| (k.clone(), t.ty()))
                    .collect(),
            ),
        );
        let counts = || Ty::map(Ty::String, Ty::Int);
        let customer = Ty::object(
            "customer",
            vec![
                ("id", Ty::String),
                ("country", Ty::String),
                ("city", Ty::String),
                ("birthday", Ty::Timestamp),
                ("tags", Ty::list(Ty::String)),
                ("consents", Ty::map(Ty::String, Ty::Bool)),
                ("created_at", Ty::Timestamp),
                ("attributes", attrs),
                ("lifetime_spend", Ty::Int),
                ("spend_30d", Ty::Int),
                ("spend_90d", Ty::Int),
                ("spend_365d", Ty::Int),
                ("orders_total", Ty::Int),
                ("orders_30d", Ty::Int),
                ("orders_90d", Ty::Int),
                ("orders_365d", Ty::Int),
                ("last_order_at", Ty::Timestamp),
                ("events_30d", counts()),
                ("events_90d", counts()),
                ("events_365d", counts()),
                ("redemptions", counts()),
            ],
        );
        let mut vars = BTreeMap::from([("customer", customer), ("now", Ty::Timestamp)]);
        if scope == Scope::Campaign {
            let line = Ty::object(
                "order.line",
                vec![
                    ("sku", Ty::String),
                    ("categories", Ty::list(Ty::String)),
                    ("collections", Ty::list(Ty::String)),
                    ("quantity", Ty::Int),
                    ("unit_price", Ty::Int),
                    ("total", Ty::Int),
                    ("on_sale", Ty::Bool),
                ],
            );
            vars.insert(
                "order",
                Ty::object(
                    "order",
                    vec![
                        ("currency", Ty::String),
                        ("subtotal", Ty::Int),
                        ("total", Ty::Int),
                        ("shipping", Ty::Int),
                        ("quantity", Ty::Int),
                        ("lines", Ty::list(line)),
                    ],
                ),
            );
            vars.insert(
                "event",
                Ty::object(
                    "event",
                    vec![
                        ("type", Ty::String),
                        ("properties", Ty::map(Ty::String, Ty::Dyn)),
                        ("occurred_at", Ty::Timestamp),
                    ],
                ),
            );
            vars.insert("segments", Ty::list(Ty::String));
            vars.insert("tier", Ty::String);
            vars.insert(
                "campaign",
                Ty::object(
                    "campaign",
                    vec![
                        ("id", Ty::String),
                        ("redemptions", Ty::Int),
                        ("discount_total", Ty::Int),
                        ("customer_redemptions", Ty::Int),
                    ],
                ),
            );
        }
        Self { vars }
    }
}
