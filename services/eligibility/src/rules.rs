//! Rules: CEL expressions compiled and type-checked once when saved, then evaluated many
//! times against a customer's facts.
//!
//! The `cel` crate parses and interprets; it has no type checker, so [`check`] walks the
//! parsed tree against the declared shape of the context ([`Schema`]): unknown variables,
//! unknown fields (e.g. an undeclared customer attribute) and operators applied to the wrong
//! types are refused with their position, before anything is stored. Size and depth are
//! bounded, and comprehensions may nest at most twice, so an evaluation costs at most
//! (cart lines)² steps.
//!
//! The context a rule sees:
//! * `customer`: `id`, `country`, `city`, `birthday` (timestamp, epoch when unknown), `tags`,
//!   `consents` (map string → bool), `created_at`, `attributes.<declared name>`, and the
//!   aggregates `lifetime_spend`, `spend_30d|90d|365d`, `orders_total`, `orders_30d|90d|365d`,
//!   `last_order_at` (epoch when none), `events_30d|90d|365d` (map type → count) and
//!   `redemptions` (map campaign → count). Amounts are minor units.
//! * `order`: the cart: `currency`, `subtotal`, `total` (= subtotal; discounts are not known
//!   when rules run), `shipping`, `quantity`, `lines` (each `sku`, `categories`, `collections`,
//!   `quantity`, `unit_price`, `total`, `on_sale`).
//! * `event`: `type`, `properties` (map), `occurred_at`.
//! * `segments`: the ids of the customer's segments. `tier`: the customer's tier code or "".
//! * `now`: a timestamp at the tenant's UTC offset, so `now.getHours()` is local time;
//!   `now.getHours("Europe/Rome")` reads any other zone.
//! * `campaign`: `id`, `redemptions`, `discount_total`, `customer_redemptions`.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, LazyLock};

use cel::common::ast::{ComprehensionExpr, EntryExpr, Expr, IdedExpr, LiteralValue};
use cel::{Env, Program};

/// Longest rule source accepted.
pub const MAX_SOURCE: usize = 4096;
/// Most nodes in a rule's tree (after macro expansion).
pub const MAX_NODES: usize = 1000;
/// Deepest nesting of a rule's tree.
pub const MAX_DEPTH: usize = 40;
/// Most nested comprehensions (`exists`, `all`, `map`, `filter`).
pub const MAX_LOOP_NESTING: usize = 2;

/// The CEL environment every rule is compiled and run with.
pub static ENV: LazyLock<Arc<Env>> = LazyLock::new(|| Arc::new(Env::stdlib()));

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
    fn list(t: Ty) -> Ty {
        Ty::List(Box::new(t))
    }

    fn map(k: Ty, v: Ty) -> Ty {
        Ty::Map(Box::new(k), Box::new(v))
    }

    fn object(name: &'static str, fields: Vec<(&str, Ty)>) -> Ty {
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

    fn numeric(&self) -> bool {
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
    vars: BTreeMap<&'static str, Ty>,
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

/// Why a rule was refused: the message and where (1-based line and column).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError {
    pub message: String,
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.line, self.column, self.message)
    }
}

/// A compiled, type-checked rule.
#[derive(Debug)]
pub struct Rule {
    pub source: String,
    pub program: Program,
    /// Top-level variables it reads.
    pub reads: Vec<String>,
    /// The event type the rule requires (`event.type == "…"` as a top-level conjunct), so
    /// an index can skip it for other events without evaluating it.
    pub event_type: Option<String>,
}

/// The literal `event.type` is compared with in a top-level conjunct of `e`, if any.
fn required_event_type(e: &IdedExpr) -> Option<String> {
    let Expr::Call(call) = &e.expr else {
        return None;
    };
    match (call.func_name.as_str(), call.args.as_slice()) {
        ("_&&_", [a, b]) => required_event_type(a).or_else(|| required_event_type(b)),
        ("_==_", [a, b]) => {
            let is_event_type = |x: &IdedExpr| {
                matches!(&x.expr, Expr::Select(s) if !s.test && s.field == "type"
                    && matches!(&s.operand.expr, Expr::Ident(n) if n == "event"))
            };
            let literal = |x: &IdedExpr| match &x.expr {
                Expr::Literal(LiteralValue::String(v)) => Some(v.inner().to_string()),
                _ => None,
            };
            if is_event_type(a) {
                literal(b)
            } else if is_event_type(b) {
                literal(a)
            } else {
                None
            }
        }
        _ => None,
    }
}

/// Stack for parsing: the parser and the tree it builds recurse once per nesting level, and
/// a hostile rule within [`MAX_SOURCE`] can nest thousands deep. The type check then refuses
/// anything deeper than [`MAX_DEPTH`], which bounds evaluation on ordinary threads.
const PARSE_STACK: usize = 256 << 20;

/// Compiles and type-checks `source` against `schema`; the rule must be a bool. Runs on a
/// thread of its own with a large (virtual, lazily mapped) stack; see [`PARSE_STACK`].
pub fn compile(source: &str, schema: &Schema) -> Result<Rule, RuleError> {
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("rule-compiler".into())
            .stack_size(PARSE_STACK)
            .spawn_scoped(scope, || compile_here(source, schema))
            .map_err(|e| RuleError {
                message: format!("cannot compile now: {e}"),
                line: 1,
                column: 1,
            })?
            .join()
            .unwrap_or_else(|_| {
                Err(RuleError {
                    message: "the rule could not be parsed".into(),
                    line: 1,
                    column: 1,
                })
            })
    })
}

fn compile_here(source: &str, schema: &Schema) -> Result<Rule, RuleError> {
    if source.trim().is_empty() {
        return Err(RuleError {
            message: "is empty".into(),
            line: 1,
            column: 1,
        });
    }
    if source.len() > MAX_SOURCE {
        return Err(RuleError {
            message: format!("is longer than {MAX_SOURCE} bytes"),
            line: 1,
            column: 1,
        });
    }
    let program = ENV.compile(source).map_err(|errors| {
        let first = errors.errors.first();
        RuleError {
            message: first.map_or_else(|| "does not parse".into(), |e| e.msg.clone()),
            line: first.map_or(1, |e| usize::try_from(e.pos.0).unwrap_or(0).max(1)),
            column: first.map_or(1, |e| usize::try_from(e.pos.1).unwrap_or(0).max(1)),
        }
    })?;
    let mut checker = Checker {
        schema,
        scopes: Vec::new(),
        nodes: 0,
        loops: 0,
        reads: Vec::new(),
    };
    let root = program.expression();
    let ty = checker
        .check(root, 1)
        .map_err(|(id, message)| locate(&program, source, id, message))?;
    if !matches!(ty, Ty::Bool | Ty::Dyn) {
        return Err(locate(
            &program,
            source,
            root.id,
            format!("a rule must be a bool, this one is {ty}"),
        ));
    }
    let mut reads = checker.reads;
    reads.sort();
    reads.dedup();
    let event_type = required_event_type(program.expression());
    Ok(Rule {
        source: source.to_string(),
        program,
        reads,
        event_type,
    })
}

fn locate(program: &Program, source: &str, id: u64, message: String) -> RuleError {
    let offset = program
        .source_info()
        .offset_for(id)
        .map_or(0, |(start, _)| start as usize);
    let before: Vec<char> = source.chars().take(offset).collect();
    let line = 1 + before.iter().filter(|c| **c == '\n').count();
    let column = 1 + before.iter().rev().take_while(|c| **c != '\n').count();
    RuleError {
        message,
        line,
        column,
    }
}

type Check = Result<Ty, (u64, String)>;

struct Checker<'s> {
    schema: &'s Schema,
    scopes: Vec<(String, Ty)>,
    nodes: usize,
    loops: usize,
    reads: Vec<String>,
}

impl Checker<'_> {
    fn check(&mut self, e: &IdedExpr, depth: usize) -> Check {
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err((
                e.id,
                format!("the rule is too large (over {MAX_NODES} nodes)"),
            ));
        }
        if depth > MAX_DEPTH {
            return Err((e.id, format!("the rule nests deeper than {MAX_DEPTH}")));
        }
        let d = depth + 1;
        match &e.expr {
            Expr::Unspecified => Err((e.id, "incomplete expression".into())),
            Expr::Literal(l) => Ok(match l {
                LiteralValue::Boolean(_) => Ty::Bool,
                LiteralValue::Bytes(_) => Ty::Bytes,
                LiteralValue::Double(_) => Ty::Double,
                LiteralValue::Int(_) => Ty::Int,
                LiteralValue::Null => Ty::Null,
                LiteralValue::String(_) => Ty::String,
                LiteralValue::UInt(_) => Ty::Uint,
            }),
            Expr::Ident(name) => {
                if let Some((_, t)) = self.scopes.iter().rev().find(|(n, _)| n == name) {
                    return Ok(t.clone());
                }
                match self.schema.vars.get(name.as_str()) {
                    Some(t) => {
                        self.reads.push(name.clone());
                        Ok(t.clone())
                    }
                    None => Err((
                        e.id,
                        format!(
                            "unknown variable '{name}' (known: {})",
                            self.schema
                                .vars
                                .keys()
                                .copied()
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    )),
                }
            }
            Expr::Select(s) => {
                let operand = self.check(&s.operand, d)?;
                let field_ty = match &operand {
                    Ty::Object(name, fields) => match fields.get(&s.field) {
                        Some(t) => t.clone(),
                        None if *name == "customer.attributes" => {
                            return Err((
                                e.id,
                                format!("unknown attribute '{}' (declare it first)", s.field),
                            ));
                        }
                        None => {
                            return Err((e.id, format!("{name} has no field '{}'", s.field)));
                        }
                    },
                    Ty::Map(k, v) if matches!(**k, Ty::String | Ty::Dyn) => (**v).clone(),
                    Ty::Dyn => Ty::Dyn,
                    other => {
                        return Err((e.id, format!("cannot select '{}' of {other}", s.field)));
                    }
                };
                Ok(if s.test { Ty::Bool } else { field_ty })
            }
            Expr::List(l) => {
                let mut elem: Option<Ty> = None;
                for x in &l.elements {
                    let t = self.check(x, d)?;
                    elem = Some(match elem {
                        None => t,
                        Some(prev) if prev == t => prev,
                        Some(_) => Ty::Dyn,
                    });
                }
                Ok(Ty::list(elem.unwrap_or(Ty::Dyn)))
            }
            Expr::Map(m) => {
                for entry in &m.entries {
                    match &entry.expr {
                        EntryExpr::MapEntry(me) => {
                            self.check(&me.key, d)?;
                            self.check(&me.value, d)?;
                        }
                        EntryExpr::StructField(_) => {
                            return Err((entry.id, "struct fields are not supported".into()));
                        }
                    }
                }
                Ok(Ty::map(Ty::Dyn, Ty::Dyn))
            }
            Expr::Struct(_) => Err((e.id, "message construction is not supported".into())),
            Expr::Comprehension(c) => self.comprehension(e.id, c, d),
            Expr::Call(call) => {
                let target = match &call.target {
                    Some(t) => Some(self.check(t, d)?),
                    None => None,
                };
                let mut args = Vec::with_capacity(call.args.len());
                for a in &call.args {
                    args.push(self.check(a, d)?);
                }
                call_type(&call.func_name, target.as_ref(), &args).map_err(|m| (e.id, m))
            }
        }
    }

    fn comprehension(&mut self, id: u64, c: &ComprehensionExpr, d: usize) -> Check {
        self.loops += 1;
        if self.loops > MAX_LOOP_NESTING {
            return Err((
                id,
                format!("comprehensions nest deeper than {MAX_LOOP_NESTING}"),
            ));
        }
        let range = self.check(&c.iter_range, d)?;
        let (first, second) = match &range {
            Ty::List(t) => (Ty::Int, (**t).clone()),
            Ty::Map(k, v) => ((**k).clone(), (**v).clone()),
            Ty::Dyn => (Ty::Dyn, Ty::Dyn),
            other => return Err((id, format!("cannot iterate over {other}"))),
        };
        let depth = self.scopes.len();
        match &c.iter_var2 {
            // Two-variable forms bind (index, element) or (key, value).
            Some(v2) => {
                self.scopes.push((c.iter_var.clone(), first));
                self.scopes.push((v2.clone(), second));
            }
            None => {
                let single = if matches!(range, Ty::List(_)) {
                    second
                } else {
                    first
                };
                self.scopes.push((c.iter_var.clone(), single));
            }
        }
        let accu = self.check(&c.accu_init, d)?;
        self.scopes.push((c.accu_var.clone(), accu));
        let result = (|| {
            self.check(&c.loop_cond, d)?;
            self.check(&c.loop_step, d)?;
            self.check(&c.result, d)
        })();
        self.scopes.truncate(depth);
        self.loops -= 1;
        result
    }
}

fn same_or_dyn(a: &Ty, b: &Ty) -> bool {
    a == b
        || matches!(a, Ty::Dyn)
        || matches!(b, Ty::Dyn)
        || (a.numeric() && b.numeric())
        || matches!(a, Ty::Null)
        || matches!(b, Ty::Null)
        || (matches!(a, Ty::List(_)) && matches!(b, Ty::List(_)))
        || (matches!(a, Ty::Map(..)) && matches!(b, Ty::Map(..)))
}

fn call_type(name: &str, target: Option<&Ty>, args: &[Ty]) -> Result<Ty, String> {
    use Ty::*;
    let bad = || {
        let mut types: Vec<std::string::String> = target.iter().map(|t| t.to_string()).collect();
        types.extend(args.iter().map(|t| t.to_string()));
        format!(
            "'{}' cannot be applied to ({})",
            display_op(name),
            types.join(", ")
        )
    };
    let is = |t: &Ty, want: &Ty| t == want || *t == Dyn;
    match (name, target, args) {
        ("_&&_" | "_||_", None, [a, b]) if is(a, &Bool) && is(b, &Bool) => Ok(Bool),
        ("!_" | "@not_strictly_false", None, [a]) if is(a, &Bool) => Ok(Bool),
        ("_==_" | "_!=_", None, [a, b]) if same_or_dyn(a, b) => Ok(Bool),
        ("_<_" | "_<=_" | "_>_" | "_>=_", None, [a, b])
            if (a.numeric() && b.numeric())
                || (a == b && matches!(a, String | Timestamp | Duration | Bool | Bytes))
                || *a == Dyn
                || *b == Dyn =>
        {
            Ok(Bool)
        }
        ("_+_", None, [a, b]) => match (a, b) {
            (Int, Int) | (Uint, Uint) | (Double, Double) | (String, String) | (Bytes, Bytes) => {
                Ok(a.clone())
            }
            (List(_), List(_)) => Ok(a.clone()),
            (Timestamp, Duration) | (Duration, Timestamp) => Ok(Timestamp),
            (Duration, Duration) => Ok(Duration),
            (Dyn, t) | (t, Dyn) => Ok(t.clone()),
            _ => Err(bad()),
        },
        ("_-_", None, [a, b]) => match (a, b) {
            (Int, Int) | (Uint, Uint) | (Double, Double) => Ok(a.clone()),
            (Timestamp, Timestamp) => Ok(Duration),
            (Timestamp, Duration) => Ok(Timestamp),
            (Duration, Duration) => Ok(Duration),
            (Dyn, t) | (t, Dyn) => Ok(t.clone()),
            _ => Err(bad()),
        },
        ("_*_" | "_/_" | "_%_", None, [a, b]) => match (a, b) {
            (Int, Int) | (Uint, Uint) | (Double, Double) => Ok(a.clone()),
            (Dyn, t) | (t, Dyn) if t.numeric() => Ok(t.clone()),
            _ => Err(bad()),
        },
        ("-_", None, [a]) if matches!(a, Int | Double | Duration | Dyn) => Ok(a.clone()),
        ("_?_:_", None, [c, a, b]) if is(c, &Bool) => Ok(if a == b { a.clone() } else { Dyn }),
        ("_[_]" | "_[?_]", None, [coll, key]) => match coll {
            List(t) if is(key, &Int) || *key == Uint => Ok((**t).clone()),
            Map(k, v) if same_or_dyn(k, key) => Ok((**v).clone()),
            Dyn => Ok(Dyn),
            _ => Err(bad()),
        },
        ("@in", None, [item, coll]) => match coll {
            List(t) if same_or_dyn(t, item) => Ok(Bool),
            Map(k, _) if same_or_dyn(k, item) => Ok(Bool),
            Dyn => Ok(Bool),
            _ => Err(bad()),
        },
        ("size", None, [a]) | ("size", Some(a), []) => match a {
            String | Bytes | List(_) | Map(..) | Dyn => Ok(Int),
            _ => Err(bad()),
        },
        ("contains" | "startsWith" | "endsWith" | "matches", Some(s), [a])
            if is(s, &String) && is(a, &String) =>
        {
            Ok(Bool)
        }
        ("lowerAscii" | "upperAscii" | "trim", Some(s), []) if is(s, &String) => Ok(String),
        ("int", None, [a]) if !matches!(a, List(_) | Map(..) | Object(..)) => Ok(Int),
        ("uint", None, [a]) if a.numeric() || *a == String => Ok(Uint),
        ("double", None, [a]) if a.numeric() || *a == String => Ok(Double),
        ("string", None, [_]) => Ok(String),
        ("timestamp", None, [a]) if is(a, &String) || is(a, &Int) => Ok(Timestamp),
        ("duration", None, [a]) if is(a, &String) => Ok(Duration),
        (
            "getFullYear" | "getMonth" | "getDayOfYear" | "getDayOfMonth" | "getDate"
            | "getDayOfWeek" | "getHours" | "getMinutes" | "getSeconds" | "getMilliseconds",
            Some(t),
            tz,
        ) if is(t, &Timestamp) && (tz.is_empty() || (tz.len() == 1 && is(&tz[0], &String))) => {
            Ok(Int)
        }
        ("getHours" | "getMinutes" | "getSeconds" | "getMilliseconds", Some(Duration), []) => {
            Ok(Int)
        }
        ("max" | "min", None, args) if !args.is_empty() => Ok(args[0].clone()),
        (
            "_&&_"
            | "_||_"
            | "!_"
            | "_==_"
            | "_!=_"
            | "_<_"
            | "_<=_"
            | "_>_"
            | "_>=_"
            | "-_"
            | "_?_:_"
            | "@in"
            | "size"
            | "contains"
            | "startsWith"
            | "endsWith"
            | "matches"
            | "lowerAscii"
            | "upperAscii"
            | "trim"
            | "int"
            | "uint"
            | "double"
            | "timestamp"
            | "duration"
            | "getFullYear"
            | "getMonth"
            | "getDayOfYear"
            | "getDayOfMonth"
            | "getDate"
            | "getDayOfWeek"
            | "getHours"
            | "getMinutes"
            | "getSeconds"
            | "getMilliseconds"
            | "@not_strictly_false",
            _,
            _,
        ) => Err(bad()),
        _ => Err(format!("unknown function '{name}'")),
    }
}

fn display_op(name: &str) -> &str {
    match name {
        "_&&_" => "&&",
        "_||_" => "||",
        "!_" => "!",
        "_==_" => "==",
        "_!=_" => "!=",
        "_<_" => "<",
        "_<=_" => "<=",
        "_>_" => ">",
        "_>=_" => ">=",
        "_+_" => "+",
        "_-_" | "-_" => "-",
        "_*_" => "*",
        "_/_" => "/",
        "_%_" => "%",
        "_[_]" | "_[?_]" => "[]",
        "@in" => "in",
        "_?_:_" => "?:",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> Schema {
        Schema::new(
            &BTreeMap::from([
                ("vip".to_string(), AttrType::Bool),
                ("score".to_string(), AttrType::Number),
            ]),
            Scope::Campaign,
        )
    }

    #[test]
    fn the_issue_examples_compile() {
        for rule in [
            r#"customer.spend_365d >= 100000 && customer.country == "GB""#,
            "order.total > 10000",
            r#"order.lines.exists(l, l.sku == "IPHONE-X")"#,
            r#"event.type == "newsletter_signup""#,
            r#"now.getDayOfWeek("Europe/Rome") == 5 && now.getHours("Europe/Rome") >= 17 && now.getHours("Europe/Rome") < 19"#,
            r#""vip" in segments && tier == "gold""#,
            "customer.attributes.vip && customer.attributes.score > 2.5",
            r#"customer.events_30d["review"] >= 2 || has(customer.events_30d.like)"#,
            "order.lines.all(l, l.categories.exists(c, c == 'phones'))",
            "campaign.customer_redemptions < 1 && size(customer.tags) > 0",
            "now - customer.last_order_at > duration('720h')",
        ] {
            let r = compile(rule, &schema());
            assert!(r.is_ok(), "{rule}: {r:?}");
        }
    }

    #[test]
    fn a_required_event_type_is_found_for_the_index() {
        let found = |rule: &str| compile(rule, &schema()).expect(rule).event_type;
        assert_eq!(
            found(r#"event.type == "review""#).as_deref(),
            Some("review")
        );
        assert_eq!(
            found(r#"order.total > 1 && ("like" == event.type && true)"#).as_deref(),
            Some("like")
        );
        assert_eq!(found(r#"event.type == "a" || order.total > 1"#), None);
        assert_eq!(found(r#"event.type != "a""#), None);
    }

    #[test]
    fn errors_name_the_position() {
        let cases = [
            (
                "customer.attributes.tier == 'x'",
                "unknown attribute 'tier'",
                1,
                20,
            ),
            (
                "order.total > 'ten'",
                "'>' cannot be applied to (int, string)",
                1,
                13,
            ),
            (
                "order.total + 1",
                "a rule must be a bool, this one is int",
                1,
                13,
            ),
            ("basket.total > 1", "unknown variable 'basket'", 1, 1),
            ("customer.nope", "customer has no field 'nope'", 1, 9),
            ("order.total >", "", 1, 14),
            ("frobnicate(1)", "unknown function 'frobnicate'", 1, 11),
            ("true &&\n  order.lines.size() == 'x'", "'==' cannot", 2, 22),
        ];
        for (rule, message, line, column) in cases {
            let err = compile(rule, &schema()).expect_err(rule);
            assert!(err.message.contains(message), "{rule}: {err}");
            assert_eq!((err.line, err.column), (line, column), "{rule}: {err}");
        }
    }

    #[test]
    fn limits_bound_the_cost() {
        let long = vec!["order.total > 1"; 400].join(" && ");
        assert!(compile(&long, &schema()).is_err());
        let nested = "order.lines.exists(a, order.lines.exists(b, order.lines.exists(c, a == b)))";
        let err = compile(nested, &schema()).unwrap_err();
        assert!(err.message.contains("comprehensions nest"), "{err}");
        // Parentheses build no nodes; nested lists do.
        let parens = format!("{}true{}", "(".repeat(60), ")".repeat(60));
        assert!(compile(&parens, &schema()).is_ok());
        let lists = format!("size({}1{}) == 1", "[".repeat(60), "]".repeat(60));
        assert!(compile(&lists, &schema()).is_err());
        let deeper = format!("{}true{}", "[".repeat(2000), "]".repeat(2000));
        assert!(compile(&deeper, &schema()).is_err());
        let long_sum = format!("{} == 1", vec!["1"; 2000].join("+"));
        let err = compile(&long_sum, &schema()).unwrap_err();
        assert!(
            err.message.contains("deeper than") || err.message.contains("too large"),
            "{err}"
        );
        assert!(compile("  ", &schema()).is_err());
    }

    fn at(rfc3339: &str) -> cel::Value {
        cel::Value::Timestamp(chrono::DateTime::parse_from_rfc3339(rfc3339).expect("time"))
    }

    #[test]
    fn friday_evening_in_rome_is_judged_in_rome() {
        let rule = compile(
            r#"now.getDayOfWeek("Europe/Rome") == 5 && now.getHours("Europe/Rome") >= 17 && now.getHours("Europe/Rome") < 19"#,
            &schema(),
        )
        .expect("compiles");
        for (now, expected) in [
            ("2026-11-27T16:30:00Z", true),       // Friday 17:30 in Rome (UTC+1)
            ("2026-11-27T17:59:59Z", true),       // Friday 18:59:59
            ("2026-11-27T18:00:00Z", false),      // Friday 19:00
            ("2026-11-27T15:30:00Z", false),      // Friday 16:30
            ("2026-11-26T16:30:00Z", false),      // Thursday 17:30
            ("2026-07-03T15:30:00Z", true),       // Friday 17:30 in summer (UTC+2)
            ("2026-11-27T23:30:00-08:00", false), // Saturday 08:30 in Rome
        ] {
            let mut ctx = cel::Context::with_env(ENV.clone());
            ctx.add_variable_from_value("now", at(now));
            assert_eq!(
                rule.program.execute(&ctx),
                Ok(cel::Value::Bool(expected)),
                "{now}"
            );
        }
    }

    #[test]
    fn segment_rules_see_only_the_customer() {
        let s = Schema::new(&BTreeMap::new(), Scope::Segment);
        assert!(compile("customer.orders_90d > 2", &s).is_ok());
        let err = compile("order.total > 1", &s).unwrap_err();
        assert!(err.message.contains("unknown variable 'order'"), "{err}");
    }
}
