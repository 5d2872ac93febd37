//! The type checker the `cel` crate lacks: walks a parsed rule against its [`Schema`] and
//! refuses unknown variables and fields and operators on the wrong types, with their node.

use cel::common::ast::{ComprehensionExpr, EntryExpr, Expr, IdedExpr, LiteralValue};

use super::schema::*;
use super::{MAX_DEPTH, MAX_LOOP_NESTING, MAX_NODES};

pub(crate) type Check = Result<Ty, (u64, String)>;

pub(crate) struct Checker<'s> {
    pub(crate) schema: &'s Schema,
    pub(crate) scopes: Vec<(String, Ty)>,
    pub(crate) nodes: usize,
    pub(crate) loops: usize,
    pub(crate) reads: Vec<String>,
}

impl Checker<'_> {
    pub(crate) fn check(&mut self, e: &IdedExpr, depth: usize) -> Check {
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
