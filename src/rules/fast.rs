//! A compiled form of `decide` for scripts written in the common subset of
//! rhai: `let`, `if`/`else`, `return`, property access on the event, the
//! customer and JSON maps, comparisons, `&&`/`||`/`!`, `+ - * /`, string
//! interpolation, map and array literals, calls to the script's own
//! functions and to `start`, `skip`, `money`, `has`, `in`, `in_journey`,
//! `converted`, `consented`.
//!
//! Why: the interpreter spends most of an evaluation on its own machinery
//! (scope, function resolution, `Dynamic` boxing, turning `event.data` into a
//! rhai map), several times what the script's logic costs. This reads the
//! event's decoded JSON in place instead.
//!
//! It is never the authority. It walks the AST rhai itself runs (after rhai's
//! optimiser), and whenever a value is outside what it models exactly
//! (a type rhai would reject, an overflow, a `throw`) it gives up and the
//! caller runs the interpreter, whose answer and error messages stand.
//! Scripts are pure (no loops, no assignments, no printing in this subset),
//! so running the interpreter after a partial evaluation is safe. A script
//! using anything else is simply not compiled. Tests compare both on the
//! shipped journeys and on a table of operators × value types.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Write as _;

use rhai::{ASTFlags, ASTNode, Expr, Stmt, Token, AST};
use serde_json::{Map, Value};

use crate::context::CustomerContext;
use crate::event::Event;
use crate::model::{ChannelKind, Decision, InstanceStatus};

/// Longest string rhai builds under our limits; longer ones are its error.
const MAX_STRING: usize = 64 * 1024;
/// Script function calls deeper than this are left to the interpreter
/// (which stops runaway recursion with its own error).
const MAX_DEPTH: usize = 16;

/// `decide` and the script functions it calls, compiled.
#[derive(Debug)]
pub(super) struct Program {
    funcs: Vec<Func>,
}

#[derive(Debug)]
struct Func {
    slots: usize,
    body: Vec<St>,
}

#[derive(Debug)]
enum St {
    Let(usize, Ex),
    If(Ex, Vec<St>, Vec<St>),
    Return(Option<Ex>),
    /// `throw`: the interpreter raises it.
    GiveUp,
    Expr(Ex),
    Block(Vec<St>),
}

#[derive(Debug)]
enum Ex {
    Unit,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    /// A constant array or map literal (folded by rhai's optimiser).
    Json(Value),
    Var(usize),
    /// `base.name`, or `base?.name` when `elvis`.
    Prop(Box<Ex>, String, bool),
    /// `base["name"]` with a constant string.
    Field(Box<Ex>, String),
    Interp(Vec<Ex>),
    Array(Vec<Ex>),
    Map(Vec<(String, Ex)>),
    And(Vec<Ex>),
    Or(Vec<Ex>),
    Coalesce(Vec<Ex>),
    Not(Box<Ex>),
    Neg(Box<Ex>),
    Bin(Op, Box<Ex>, Box<Ex>),
    /// `x == ()`, or `x != ()` when negated.
    IsUnit(Box<Ex>, bool),
    Call(Builtin, Vec<Ex>),
    Script(usize, Vec<Ex>),
    Block(Vec<St>),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Add,
    Sub,
    Mul,
    Div,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Builtin {
    Start,
    Skip,
    Money,
    Has,
    Contains,
    InJourney,
    Converted,
    Consented,
}

impl Builtin {
    fn resolve(name: &str, arity: usize) -> Option<Self> {
        Some(match (name, arity) {
            ("start", 0..=2) => Builtin::Start,
            ("skip", 1) => Builtin::Skip,
            ("money", 1) => Builtin::Money,
            ("has", 2) => Builtin::Has,
            ("contains", 2) => Builtin::Contains,
            ("in_journey", 2) => Builtin::InJourney,
            ("converted", 2) => Builtin::Converted,
            ("consented", 3) => Builtin::Consented,
            _ => return None,
        })
    }
}

/// Why a script is left to the interpreter (for the debug log).
pub(super) type Unsupported = String;

/// Compiles `decide(event, customer)` of a loaded script, or says what in it
/// is outside the subset.
pub(super) fn compile(ast: &AST) -> Result<Program, Unsupported> {
    let mut c = Compiler {
        ast,
        program: Program { funcs: Vec::new() },
        compiled: Vec::new(),
    };
    c.function("decide", 2)?;
    Ok(c.program)
}

struct Compiler<'a> {
    ast: &'a AST,
    program: Program,
    /// (name, arity) → index in `program.funcs`, in compile order.
    compiled: Vec<(String, usize)>,
}

/// The top-level statements of a script function's body, as rhai runs them.
/// (The body's type is private to rhai; walking a copy holding only this
/// function reaches its statements.)
fn body_of(ast: &AST, name: &str, arity: usize) -> Vec<Stmt> {
    let mut one = ast.clone_functions_only();
    one.retain_functions(|_, _, n, a| n == name && a == arity);
    let mut out = Vec::new();
    one.walk(&mut |path: &[ASTNode]| {
        if let [ASTNode::Stmt(s)] = path {
            out.push((*s).clone());
        }
        true
    });
    out
}

/// Names in scope while compiling one function: slot per `let`.
struct Scope {
    names: Vec<(String, usize)>,
    next_slot: usize,
}

impl Scope {
    fn declare(&mut self, name: &str) -> usize {
        let slot = self.next_slot;
        self.next_slot += 1;
        self.names.push((name.to_string(), slot));
        slot
    }
    fn find(&self, name: &str) -> Option<usize> {
        self.names
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, s)| *s)
    }
}

impl Compiler<'_> {
    fn function(&mut self, name: &str, arity: usize) -> Result<usize, Unsupported> {
        if let Some(i) = self
            .compiled
            .iter()
            .position(|(n, a)| n == name && *a == arity)
        {
            return Ok(i);
        }
        let def = self
            .ast
            .iter_fn_def()
            .find(|f| f.name == name && f.params.len() == arity)
            .ok_or_else(|| format!("no script function {name}/{arity}"))?;
        if def.this_type.is_some() {
            return Err(format!("{name} is a method"));
        }
        let params: Vec<String> = def.params.iter().map(|p| p.to_string()).collect();
        let stmts = body_of(self.ast, name, arity);
        // Reserve the index first, so recursive calls resolve.
        let index = self.program.funcs.len();
        self.compiled.push((name.to_string(), arity));
        self.program.funcs.push(Func {
            slots: 0,
            body: Vec::new(),
        });
        let mut scope = Scope {
            names: Vec::new(),
            next_slot: 0,
        };
        for p in &params {
            scope.declare(p);
        }
        let body = self.block(&stmts, &mut scope)?;
        self.program.funcs[index] = Func {
            slots: scope.next_slot,
            body,
        };
        Ok(index)
    }

    fn block(&mut self, stmts: &[Stmt], scope: &mut Scope) -> Result<Vec<St>, Unsupported> {
        let depth = scope.names.len();
        let mut out = Vec::with_capacity(stmts.len());
        for s in stmts {
            out.push(self.stmt(s, scope)?);
        }
        scope.names.truncate(depth);
        Ok(out)
    }

    fn stmt(&mut self, s: &Stmt, scope: &mut Scope) -> Result<St, Unsupported> {
        Ok(match s {
            Stmt::Noop(_) => St::Expr(Ex::Unit),
            Stmt::Var(x, _, _) => {
                let (ident, init, _) = &**x;
                // The initialiser is compiled before the name is in scope.
                let init = self.expr(init, scope)?;
                St::Let(scope.declare(&ident.name), init)
            }
            Stmt::If(flow, _) => St::If(
                self.expr(&flow.expr, scope)?,
                self.block(flow.body.statements(), scope)?,
                self.block(flow.branch.statements(), scope)?,
            ),
            Stmt::Return(value, flags, _) => {
                if flags.contains(ASTFlags::BREAK) {
                    St::GiveUp
                } else {
                    St::Return(match value {
                        Some(e) => Some(self.expr(e, scope)?),
                        None => None,
                    })
                }
            }
            Stmt::Expr(e) => St::Expr(self.expr(e, scope)?),
            Stmt::FnCall(call, _) => St::Expr(self.call(call, scope)?),
            Stmt::Block(b) => St::Block(self.block(b.statements(), scope)?),
            other => return Err(format!("statement {other:?}")),
        })
    }

    fn expr(&mut self, e: &Expr, scope: &mut Scope) -> Result<Ex, Unsupported> {
        Ok(match e {
            Expr::Unit(_) => Ex::Unit,
            Expr::BoolConstant(b, _) => Ex::Bool(*b),
            Expr::IntegerConstant(i, _) => Ex::Int(*i),
            Expr::FloatConstant(f, _) => Ex::Float(**f),
            Expr::StringConstant(s, _) => Ex::Str(s.to_string()),
            Expr::DynamicConstant(d, _) => {
                if d.is_unit() {
                    Ex::Unit
                } else if let Ok(b) = d.as_bool() {
                    Ex::Bool(b)
                } else if let Ok(i) = d.as_int() {
                    Ex::Int(i)
                } else if let Ok(f) = d.as_float() {
                    Ex::Float(f)
                } else if d.is_string() {
                    Ex::Str(d.to_string())
                } else if d.is_array() || d.is_map() {
                    Ex::Json(dynamic_to_json(d).ok_or("constant of an unsupported type")?)
                } else {
                    return Err(format!("constant {}", d.type_name()));
                }
            }
            Expr::InterpolatedString(parts, _) => Ex::Interp(
                parts
                    .iter()
                    .map(|p| self.expr(p, scope))
                    .collect::<Result<_, _>>()?,
            ),
            Expr::Array(items, _) => Ex::Array(
                items
                    .iter()
                    .map(|p| self.expr(p, scope))
                    .collect::<Result<_, _>>()?,
            ),
            Expr::Map(m, _) => {
                let (pairs, _template) = &**m;
                Ex::Map(
                    pairs
                        .iter()
                        .map(|(k, v)| Ok((k.name.to_string(), self.expr(v, scope)?)))
                        .collect::<Result<_, Unsupported>>()?,
                )
            }
            Expr::Variable(x, _, _) => {
                if !x.2.is_empty() {
                    return Err("namespaced variable".into());
                }
                Ex::Var(
                    scope
                        .find(&x.1)
                        .ok_or_else(|| format!("variable {} not local", x.1))?,
                )
            }
            Expr::Stmt(block) => Ex::Block(self.block(block.statements(), scope)?),
            Expr::And(items, _) => Ex::And(self.list(items, scope)?),
            Expr::Or(items, _) => Ex::Or(self.list(items, scope)?),
            Expr::Coalesce(items, _) => Ex::Coalesce(self.list(items, scope)?),
            Expr::FnCall(call, _) => self.call(call, scope)?,
            Expr::Dot(b, flags, _) => {
                let base = self.expr(&b.lhs, scope)?;
                self.chain(base, &b.rhs, flags.contains(ASTFlags::NEGATED), scope)?
            }
            Expr::Index(b, flags, _) => {
                if !flags.contains(ASTFlags::BREAK) || flags.contains(ASTFlags::NEGATED) {
                    return Err("index chain".into());
                }
                let Expr::StringConstant(name, _) = &b.rhs else {
                    return Err("index that is not a constant string".into());
                };
                Ex::Field(Box::new(self.expr(&b.lhs, scope)?), name.to_string())
            }
            other => return Err(format!("expression {other:?}")),
        })
    }

    fn list(&mut self, items: &[Expr], scope: &mut Scope) -> Result<Vec<Ex>, Unsupported> {
        items.iter().map(|e| self.expr(e, scope)).collect()
    }

    /// The right-hand side of a `.`: a property, a method call, or more of both.
    fn chain(
        &mut self,
        base: Ex,
        rhs: &Expr,
        elvis: bool,
        scope: &mut Scope,
    ) -> Result<Ex, Unsupported> {
        Ok(match rhs {
            Expr::Property(p, _) => Ex::Prop(Box::new(base), p.2.to_string(), elvis),
            Expr::MethodCall(call, _) if !elvis => {
                // Method style reaches the host API only: a script
                // function called this way gets the object as `this`.
                if self.ast.iter_fn_def().any(|f| f.name == call.name) {
                    return Err(format!("script function {} called as a method", call.name));
                }
                let mut args = vec![base];
                args.extend(self.list(&call.args, scope)?);
                self.resolve(&call.name, args)?
            }
            Expr::Dot(b, flags, _) => {
                let inner = self.chain(base, &b.lhs, elvis, scope)?;
                self.chain(inner, &b.rhs, flags.contains(ASTFlags::NEGATED), scope)?
            }
            other => return Err(format!("chain {other:?}")),
        })
    }

    fn call(&mut self, call: &rhai::FnCallExpr, scope: &mut Scope) -> Result<Ex, Unsupported> {
        if !call.namespace.is_empty() {
            return Err("namespaced call".into());
        }
        let args = self.list(&call.args, scope)?;
        if let Some(token) = &call.op_token {
            let op = match token {
                Token::EqualsTo => Op::Eq,
                Token::NotEqualsTo => Op::Ne,
                Token::LessThan => Op::Lt,
                Token::LessThanEqualsTo => Op::Le,
                Token::GreaterThan => Op::Gt,
                Token::GreaterThanEqualsTo => Op::Ge,
                Token::Plus if args.len() == 2 => Op::Add,
                Token::Minus if args.len() == 2 => Op::Sub,
                Token::Multiply => Op::Mul,
                Token::Divide => Op::Div,
                Token::Bang if args.len() == 1 => {
                    return Ok(Ex::Not(Box::new(args.into_iter().next().expect("1 arg"))))
                }
                Token::Minus if args.len() == 1 => {
                    return Ok(Ex::Neg(Box::new(args.into_iter().next().expect("1 arg"))))
                }
                other => return Err(format!("operator {other:?}")),
            };
            let [a, b]: [Ex; 2] = args.try_into().map_err(|_| "operator arity")?;
            // `x == ()` is true for () and false for every other type.
            return Ok(match (op, a, b) {
                (Op::Eq | Op::Ne, x, Ex::Unit) | (Op::Eq | Op::Ne, Ex::Unit, x) => {
                    Ex::IsUnit(Box::new(x), op == Op::Ne)
                }
                (op, a, b) => Ex::Bin(op, Box::new(a), Box::new(b)),
            });
        }
        self.resolve(&call.name, args)
    }

    /// Script functions first, as rhai resolves them, then the host API.
    fn resolve(&mut self, name: &str, args: Vec<Ex>) -> Result<Ex, Unsupported> {
        if self
            .ast
            .iter_fn_def()
            .any(|f| f.name == name && f.params.len() == args.len())
        {
            let f = self.function(name, args.len())?;
            return Ok(Ex::Script(f, args));
        }
        match Builtin::resolve(name, args.len()) {
            Some(b) => Ok(Ex::Call(b, args)),
            None => Err(format!("function {name}/{}", args.len())),
        }
    }
}

fn dynamic_to_json(d: &rhai::Dynamic) -> Option<Value> {
    super::api::dynamic_to_json(d).ok()
}

/// A value during evaluation; JSON from the event is borrowed, not copied.
#[derive(Debug, Clone)]
enum Val<'a> {
    Unit,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Cow<'a, str>),
    Obj(&'a Map<String, Value>),
    Arr(&'a [Value]),
    List(Vec<Val<'a>>),
    Dict(BTreeMap<String, Val<'a>>),
    Event,
    Customer,
    /// Boxed: it is rare and large, and every other value moves often.
    Decision(Box<Decision>),
    /// `skip(reason)`, the reason still borrowed from the script.
    Skip(Cow<'a, str>),
}

/// A function's arguments and locals; on the stack for the usual few.
type Frame<'a> = smallvec::SmallVec<[Val<'a>; 8]>;

/// The interpreter has to decide this one (or the function returned early).
enum Stop<'a> {
    GiveUp,
    Return(Val<'a>),
}

type Eval<'a> = Result<Val<'a>, Stop<'a>>;

fn give_up<'a, T>() -> Result<T, Stop<'a>> {
    Err(Stop::GiveUp)
}

/// What rhai sees for a JSON value (as `json_to_dynamic` converts it).
fn from_json(v: &Value) -> Val<'_> {
    match v {
        Value::Null => Val::Unit,
        Value::Bool(b) => Val::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Val::Int(i),
            None => Val::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => Val::Str(Cow::Borrowed(s)),
        Value::Array(a) => Val::Arr(a),
        Value::Object(m) => Val::Obj(m),
    }
}

struct Ctx<'a> {
    program: &'a Program,
    event: &'a Event,
    customer: &'a CustomerContext,
}

impl Program {
    /// `Some(decision)` when the compiled form decided exactly as rhai
    /// would; `None` when the interpreter has to.
    pub(super) fn decide(&self, event: &Event, customer: &CustomerContext) -> Option<Decision> {
        let ctx = Ctx {
            program: self,
            event,
            customer,
        };
        let mut frame = Frame::new();
        frame.extend([Val::Event, Val::Customer]);
        let result = match ctx.call(0, frame, 0) {
            Ok(v) => v,
            Err(_) => return None,
        };
        match result {
            Val::Decision(d) => Some(*d),
            Val::Skip(reason) => Some(Decision::Skip(reason.into_owned())),
            Val::Unit => Some(Decision::Skip("decide returned ()".into())),
            Val::Bool(true) => Some(Decision::Start {
                key: None,
                vars: Map::new(),
            }),
            Val::Bool(false) => Some(Decision::Skip("decide returned false".into())),
            v @ (Val::Obj(_) | Val::Dict(_)) => Some(Decision::Start {
                key: None,
                vars: object_to_json(&v).ok()?,
            }),
            _ => None,
        }
    }
}

impl<'a> Ctx<'a> {
    /// `frame` holds the arguments (with room for the function's locals).
    fn call(&self, f: usize, mut frame: Frame<'a>, depth: usize) -> Eval<'a> {
        if depth > MAX_DEPTH {
            return give_up();
        }
        let func = &self.program.funcs[f];
        frame.resize(func.slots.max(frame.len()), Val::Unit);
        match self.block(&func.body, &mut frame, depth) {
            Ok(v) | Err(Stop::Return(v)) => Ok(v),
            Err(Stop::GiveUp) => give_up(),
        }
    }

    /// A block's value is its last statement's.
    fn block(&self, body: &'a [St], frame: &mut Frame<'a>, depth: usize) -> Eval<'a> {
        let mut last = Val::Unit;
        for s in body {
            last = match s {
                St::Let(slot, e) => {
                    frame[*slot] = self.expr(e, frame, depth)?;
                    Val::Unit
                }
                St::If(cond, then, otherwise) => match self.expr(cond, frame, depth)? {
                    Val::Bool(true) => self.block(then, frame, depth)?,
                    Val::Bool(false) => self.block(otherwise, frame, depth)?,
                    _ => return give_up(),
                },
                St::Return(None) => return Err(Stop::Return(Val::Unit)),
                St::Return(Some(e)) => return Err(Stop::Return(self.expr(e, frame, depth)?)),
                St::GiveUp => return give_up(),
                St::Expr(e) => self.expr(e, frame, depth)?,
                St::Block(b) => self.block(b, frame, depth)?,
            };
        }
        Ok(last)
    }

    fn expr(&self, e: &'a Ex, frame: &mut Frame<'a>, depth: usize) -> Eval<'a> {
        Ok(match e {
            Ex::Unit => Val::Unit,
            Ex::Bool(b) => Val::Bool(*b),
            Ex::Int(i) => Val::Int(*i),
            Ex::Float(f) => Val::Float(*f),
            Ex::Str(s) => Val::Str(Cow::Borrowed(s)),
            Ex::Json(v) => from_json(v),
            Ex::Var(slot) => frame[*slot].clone(),
            Ex::Prop(base, name, elvis) => {
                // A variable's property is read in place (no copy of the variable).
                let owned;
                let base = match &**base {
                    Ex::Var(slot) => &frame[*slot],
                    other => {
                        owned = self.expr(other, frame, depth)?;
                        &owned
                    }
                };
                if *elvis && matches!(base, Val::Unit) {
                    return Ok(Val::Unit);
                }
                self.property(base, name)?
            }
            Ex::Field(base, name) => match self.expr(base, frame, depth)? {
                v @ (Val::Obj(_) | Val::Dict(_)) => self.property(&v, name)?,
                _ => return give_up(),
            },
            Ex::Interp(parts) => {
                let mut out = String::new();
                for p in parts {
                    append_text(&mut out, &self.expr(p, frame, depth)?)?;
                }
                if out.len() > MAX_STRING {
                    return give_up();
                }
                Val::Str(Cow::Owned(out))
            }
            Ex::Array(items) => Val::List(
                items
                    .iter()
                    .map(|i| self.expr(i, frame, depth))
                    .collect::<Result<_, _>>()?,
            ),
            Ex::Map(pairs) => {
                let mut m = BTreeMap::new();
                for (k, v) in pairs {
                    m.insert(k.clone(), self.expr(v, frame, depth)?);
                }
                Val::Dict(m)
            }
            Ex::And(items) => self.short_circuit(items, false, frame, depth)?,
            Ex::Or(items) => self.short_circuit(items, true, frame, depth)?,
            Ex::Coalesce(items) => {
                let mut last = Val::Unit;
                for i in items {
                    last = self.expr(i, frame, depth)?;
                    if !matches!(last, Val::Unit) {
                        break;
                    }
                }
                last
            }
            Ex::Not(x) => match self.expr(x, frame, depth)? {
                Val::Bool(b) => Val::Bool(!b),
                _ => return give_up(),
            },
            Ex::Neg(x) => match self.expr(x, frame, depth)? {
                Val::Int(i) => Val::Int(i.checked_neg().ok_or(Stop::GiveUp)?),
                Val::Float(f) => Val::Float(-f),
                _ => return give_up(),
            },
            Ex::IsUnit(x, negated) => {
                Val::Bool(matches!(self.expr(x, frame, depth)?, Val::Unit) != *negated)
            }
            Ex::Bin(op, a, b) => {
                let a = self.expr(a, frame, depth)?;
                let b = self.expr(b, frame, depth)?;
                binary(*op, a, b)?
            }
            Ex::Call(builtin, args) => {
                let mut values = smallvec::SmallVec::<[Val<'a>; 3]>::new();
                for a in args {
                    values.push(self.expr(a, frame, depth)?);
                }
                self.builtin(*builtin, &mut values)?
            }
            Ex::Script(f, args) => {
                let mut values = Frame::new();
                for a in args {
                    values.push(self.expr(a, frame, depth)?);
                }
                self.call(*f, values, depth + 1)?
            }
            Ex::Block(b) => self.block(b, frame, depth)?,
        })
    }

    /// `&&` (stops at the first false) and `||` (at the first true); rhai
    /// accepts only bools as operands.
    fn short_circuit(
        &self,
        items: &'a [Ex],
        stop_at: bool,
        frame: &mut Frame<'a>,
        depth: usize,
    ) -> Eval<'a> {
        for i in items {
            match self.expr(i, frame, depth)? {
                Val::Bool(b) if b == stop_at => return Ok(Val::Bool(stop_at)),
                Val::Bool(_) => {}
                _ => return give_up(),
            }
        }
        Ok(Val::Bool(!stop_at))
    }

    fn property(&self, base: &Val<'a>, name: &str) -> Eval<'a> {
        let (e, c) = (self.event, self.customer);
        Ok(match base {
            Val::Obj(m) => m.get(name).map_or(Val::Unit, from_json),
            Val::Dict(m) => m.get(name).cloned().unwrap_or(Val::Unit),
            Val::Event => match name {
                "id" => Val::Str(Cow::Borrowed(&e.id)),
                "type" => Val::Str(Cow::Borrowed(&e.event_type)),
                "source" => Val::Str(Cow::Borrowed(&e.source)),
                "customer" => Val::Str(Cow::Borrowed(&e.customer)),
                "time" => Val::Str(Cow::Owned(e.time.to_rfc3339())),
                "data" => Val::Obj(&e.data),
                _ => return give_up(),
            },
            Val::Customer => match name {
                "id" => Val::Str(Cow::Borrowed(&c.id)),
                "timezone" => c
                    .timezone
                    .as_deref()
                    .map_or(Val::Unit, |t| Val::Str(Cow::Borrowed(t))),
                "has_app" => Val::Bool(c.app_installed),
                "has_email" => Val::Bool(c.reachable(ChannelKind::Email)),
                "has_phone" => Val::Bool(c.reachable(ChannelKind::CallTask)),
                "preferred_channel" => c
                    .preferred_channel
                    .map_or(Val::Unit, |ch| Val::Str(Cow::Owned(ch.to_string()))),
                "profile" => Val::Obj(&c.profile),
                "recent_contacts" => Val::Int(c.recent_sends.len() as i64),
                _ => return give_up(),
            },
            _ => return give_up(),
        })
    }

    fn builtin(&self, b: Builtin, args: &mut [Val<'a>]) -> Eval<'a> {
        let c = self.customer;
        Ok(match (b, args) {
            (Builtin::Start, []) => Val::Decision(Box::new(Decision::Start {
                key: None,
                vars: Map::new(),
            })),
            (Builtin::Start, [vars @ (Val::Obj(_) | Val::Dict(_))]) => {
                Val::Decision(Box::new(Decision::Start {
                    key: None,
                    vars: object_to_json(vars)?,
                }))
            }
            (Builtin::Start, [Val::Str(key), vars @ (Val::Obj(_) | Val::Dict(_))]) => {
                Val::Decision(Box::new(Decision::Start {
                    key: Some(key.to_string()),
                    vars: object_to_json(vars)?,
                }))
            }
            (Builtin::Skip, [Val::Str(reason)]) => Val::Skip(std::mem::take(reason)),
            (Builtin::Money, [Val::Float(x)]) => Val::Str(Cow::Owned(format!("{x:.2}"))),
            (Builtin::Money, [Val::Int(x)]) => Val::Str(Cow::Owned(format!("{x}.00"))),
            (Builtin::Has, [Val::Obj(m), Val::Str(k)]) => {
                Val::Bool(m.get(k.as_ref()).is_some_and(|v| !v.is_null()))
            }
            (Builtin::Has, [Val::Dict(m), Val::Str(k)]) => {
                Val::Bool(m.get(k.as_ref()).is_some_and(|v| !matches!(v, Val::Unit)))
            }
            // `x in container` is `contains(container, x)`.
            (Builtin::Contains, [Val::Str(s), Val::Str(x)]) => Val::Bool(s.contains(x.as_ref())),
            (Builtin::Contains, [Val::Arr(items), x]) => contains(items.iter().map(from_json), x)?,
            (Builtin::Contains, [Val::List(items), x]) => contains(items.iter().cloned(), x)?,
            (Builtin::InJourney, [Val::Customer, Val::Str(j)]) => Val::Bool(c.in_journey(j)),
            (Builtin::Converted, [Val::Customer, Val::Str(j)]) => {
                Val::Bool(c.has_status(j, InstanceStatus::Converted))
            }
            (Builtin::Consented, [Val::Customer, Val::Str(ch), Val::Str(cat)]) => {
                match (ch.parse(), cat.parse()) {
                    (Ok(ch), Ok(cat)) => Val::Bool(c.consented(ch, cat)),
                    _ => return give_up(),
                }
            }
            _ => return give_up(),
        })
    }
}

/// `x in array`: rhai compares each item with `==`.
fn contains<'a>(mut items: impl Iterator<Item = Val<'a>>, x: &Val<'a>) -> Eval<'a> {
    items.try_fold(Val::Bool(false), |found, item| match found {
        Val::Bool(true) => Ok(found),
        _ => binary(Op::Eq, item, x.clone()),
    })
}

/// Text as rhai's interpolation and `+` produce it.
fn append_text<'a>(out: &mut String, v: &Val<'a>) -> Result<(), Stop<'a>> {
    match v {
        Val::Str(s) => out.push_str(s),
        Val::Unit => {}
        Val::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Val::Int(i) => {
            let _ = write!(out, "{i}");
        }
        Val::Float(f) => push_float(out, *f),
        _ => return give_up(),
    }
    Ok(())
}

/// rhai's `FloatWrapper` display: natural notation with a `.0` on whole
/// numbers, exponent notation outside a range given as f32 constants.
fn push_float(out: &mut String, f: f64) {
    let max = 10_000_000_000_000.0_f32 as f64;
    let min = 0.000_000_000_000_1_f32 as f64;
    let abs = f.abs();
    if abs == 0.0 {
        out.push_str("0.0");
    } else if abs > max || abs < min {
        let _ = write!(out, "{f:e}");
    } else {
        let _ = write!(out, "{f}");
        if abs.fract() == 0.0 {
            out.push_str(".0");
        }
    }
}

#[derive(PartialEq)]
enum Kind {
    Unit,
    Bool,
    Int,
    Float,
    Str,
    Map,
    Array,
    Other,
}

fn kind(v: &Val) -> Kind {
    match v {
        Val::Unit => Kind::Unit,
        Val::Bool(_) => Kind::Bool,
        Val::Int(_) => Kind::Int,
        Val::Float(_) => Kind::Float,
        Val::Str(_) => Kind::Str,
        Val::Obj(_) | Val::Dict(_) => Kind::Map,
        Val::Arr(_) | Val::List(_) => Kind::Array,
        _ => Kind::Other,
    }
}

/// Exact comparison (integers, strings); `op` is a comparison.
fn compare<T: PartialOrd + ?Sized>(op: Op, x: &T, y: &T) -> bool {
    match op {
        Op::Eq => x == y,
        Op::Ne => x != y,
        Op::Lt => x < y,
        Op::Le => x <= y,
        Op::Gt => x > y,
        _ => x >= y,
    }
}

/// rhai's built-in operators (`func/builtin.rs`), for the types modelled here.
fn binary<'a>(op: Op, a: Val<'a>, b: Val<'a>) -> Eval<'a> {
    use Op::*;
    Ok(match (a, b) {
        (Val::Int(x), Val::Int(y)) => match op {
            Eq | Ne | Lt | Le | Gt | Ge => Val::Bool(compare(op, &x, &y)),
            // Overflow and division by zero are rhai's errors.
            Add => Val::Int(x.checked_add(y).ok_or(Stop::GiveUp)?),
            Sub => Val::Int(x.checked_sub(y).ok_or(Stop::GiveUp)?),
            Mul => Val::Int(x.checked_mul(y).ok_or(Stop::GiveUp)?),
            Div => Val::Int(x.checked_div(y).ok_or(Stop::GiveUp)?),
        },
        (Val::Int(x), Val::Float(y)) => float_op(op, x as f64, y),
        (Val::Float(x), Val::Int(y)) => float_op(op, x, y as f64),
        (Val::Float(x), Val::Float(y)) => float_op(op, x, y),
        (Val::Str(x), Val::Str(y)) => match op {
            Eq | Ne | Lt | Le | Gt | Ge => Val::Bool(compare(op, &x, &y)),
            Add => {
                if x.len() + y.len() > MAX_STRING {
                    return give_up();
                }
                Val::Str(Cow::Owned(x.into_owned() + &*y))
            }
            _ => return give_up(),
        },
        // `string + ()` and `() + string` are the string; other mixed
        // concatenations are left to rhai.
        (Val::Str(s), Val::Unit) | (Val::Unit, Val::Str(s)) if op == Add => Val::Str(s),
        (Val::Bool(x), Val::Bool(y)) => match op {
            Eq => Val::Bool(x == y),
            Ne => Val::Bool(x != y),
            _ => return give_up(),
        },
        (Val::Unit, Val::Unit) => match op {
            Eq | Le | Ge => Val::Bool(op == Eq),
            Ne | Lt | Gt => Val::Bool(false),
            _ => return give_up(),
        },
        (a, b) => {
            let (ka, kb) = (kind(&a), kind(&b));
            if ka == Kind::Other || kb == Kind::Other || ka == kb {
                return give_up();
            }
            match op {
                Ne => Val::Bool(true),
                Eq | Lt | Le | Gt | Ge => Val::Bool(false),
                _ => return give_up(),
            }
        }
    })
}

fn float_op<'a>(op: Op, x: f64, y: f64) -> Val<'a> {
    use Op::*;
    let max = if x * y == 0.0 {
        1.0
    } else {
        x.abs().max(y.abs())
    };
    let eps = f64::EPSILON;
    match op {
        Eq => Val::Bool(max == 0.0 || (x - y).abs() / max <= eps),
        Ne => Val::Bool(max != 0.0 && (x - y).abs() / max > eps),
        Gt => Val::Bool(max != 0.0 && (x - y) / max > eps),
        Ge => Val::Bool(max == 0.0 || (x - y) / max > -eps),
        Lt => Val::Bool(max != 0.0 && (y - x) / max > eps),
        Le => Val::Bool(max == 0.0 || (y - x) / max > -eps),
        Add => Val::Float(x + y),
        Sub => Val::Float(x - y),
        Mul => Val::Float(x * y),
        Div => Val::Float(x / y),
    }
}

/// Template variables as `map_to_json` makes them from a rhai map.
fn object_to_json<'a>(v: &Val<'a>) -> Result<Map<String, Value>, Stop<'a>> {
    match v {
        Val::Dict(m) => m
            .iter()
            .map(|(k, v)| Ok((k.clone(), to_json(v)?)))
            .collect(),
        Val::Obj(m) => {
            // Through a rhai map: keys sorted, numbers as rhai holds them.
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            Ok(keys
                .into_iter()
                .map(|k| (k.clone(), normalized(&m[k])))
                .collect())
        }
        _ => give_up(),
    }
}

fn to_json<'a>(v: &Val<'a>) -> Result<Value, Stop<'a>> {
    Ok(match v {
        Val::Unit => Value::Null,
        Val::Bool(b) => Value::Bool(*b),
        Val::Int(i) => Value::from(*i),
        Val::Float(f) => serde_json::Number::from_f64(*f)
            .map(Value::Number)
            .unwrap_or(Value::Null),
        Val::Str(s) => Value::String(s.to_string()),
        Val::Obj(_) | Val::Dict(_) => Value::Object(object_to_json(v)?),
        Val::Arr(items) => Value::Array(items.iter().map(normalized).collect()),
        Val::List(items) => Value::Array(items.iter().map(to_json).collect::<Result<_, _>>()?),
        _ => return give_up(),
    })
}

/// A JSON value after a round trip through rhai: integers beyond i64 become floats.
fn normalized(v: &Value) -> Value {
    match v {
        Value::Number(n) if n.as_i64().is_none() => {
            serde_json::Number::from_f64(n.as_f64().unwrap_or(f64::NAN))
                .map(Value::Number)
                .unwrap_or(Value::Null)
        }
        Value::Array(items) => Value::Array(items.iter().map(normalized).collect()),
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            Value::Object(
                keys.into_iter()
                    .map(|k| (k.clone(), normalized(&m[k])))
                    .collect(),
            )
        }
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::Arc;

    use serde_json::{json, Value};

    use super::super::{api, load_sources, Limits, RuleSet};
    use crate::context::CustomerContext;
    use crate::event::Event;
    use crate::model::Decision;

    fn event(event_type: &str, data: Value) -> Arc<Event> {
        let bytes = serde_json::to_vec(&json!({"specversion":"1.0","id":"e-1","type":event_type,
            "source":"test","subject":"c-1","time":"2026-03-02T01:00:00Z","data":data}))
        .unwrap();
        Arc::new(Event::parse(&bytes).unwrap())
    }

    fn shipped() -> RuleSet {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("rules");
        let mut sources = Vec::new();
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "rhai") {
                let text = std::fs::read_to_string(&p).unwrap();
                sources.push((p, text));
            }
        }
        load_sources(sources, &Limits::default()).unwrap()
    }

    /// Compiled and interpreted `decide` agree; returns whether the compiled
    /// form decided (rather than handing over to the interpreter).
    fn agree(rules: &RuleSet, journey: &str, e: &Arc<Event>, c: &Arc<CustomerContext>) -> bool {
        let j = rules.journey(journey).unwrap();
        let program = j.compiled.as_ref().expect("compiled");
        let interpreted = api::decide(&rules.engine, j, e, c);
        match program.decide(e, c) {
            Some(fast) => {
                match interpreted {
                    Ok(d) => assert_eq!(fast, d, "{journey} on {:?} / {:?}", e.data, c.profile),
                    Err(err) => panic!(
                        "{journey} on {:?}: compiled {fast:?}, interpreter failed: {err}",
                        e.data
                    ),
                }
                true
            }
            None => false,
        }
    }

    #[test]
    fn the_shipped_journeys_compile_and_decide_as_the_interpreter_does() {
        let rules = shipped();
        for j in rules.journeys() {
            assert!(j.compiled(), "{} is not compiled", j.name);
        }
        let plain = Arc::new(CustomerContext::new("c-1"));
        let amounts = [
            json!(null),
            json!(15.99),
            json!(18.99),
            json!(20),
            json!(19.999999999999999),
            json!("18.99"),
            json!(true),
        ];
        let mut decided = 0;
        for prev in &amounts {
            for new in &amounts {
                for merchant in [json!("StreamFlix"), json!(null), json!(7)] {
                    let mut data = json!({"payment_id": "p-1", "previous_amount": prev, "new_amount": new, "merchant": merchant});
                    if prev.is_null() {
                        data.as_object_mut().unwrap().remove("previous_amount");
                    }
                    let e = event("recurring_payment.amount_changed", data);
                    decided += agree(&rules, "fee_increase", &e, &plain) as usize;
                }
            }
        }
        // Numbers and missing amounts are decided natively; interpolating a
        // number as merchant or comparing a string amount is left to rhai.
        assert!(decided >= 40, "compiled form decided only {decided} of 147");

        for signed in [json!(true), json!(false), json!(null), json!("yes")] {
            for amount in [
                json!(32000.5),
                json!(500),
                json!(null),
                json!(18446744073709551615u64),
            ] {
                let e = event(
                    "loan_application.completed",
                    json!({"application_id": "A-1", "product": "Car loan", "amount": amount,
                           "resume_url": "https://x/A-1", "signed": signed, "extra": {"b": 1, "a": [1, 2]}}),
                );
                // money(()) is rhai's error to report.
                let decided = agree(&rules, "unsigned_loan", &e, &plain);
                assert_eq!(
                    decided,
                    !amount.is_null() || signed == json!(true),
                    "{amount} {signed}"
                );
            }
        }

        for (profile, converted) in [
            (
                json!({"concession_card": true, "state": "NSW", "residential_status": "renter"}),
                false,
            ),
            (
                json!({"concession_card": true, "state": "NSW", "residential_status": "renter"}),
                true,
            ),
            (
                json!({"concession_card": true, "state": "WA", "residential_status": "owner"}),
                false,
            ),
            (
                json!({"concession_card": false, "state": "VIC", "residential_status": "owner"}),
                false,
            ),
            (json!({"concession_card": true, "state": "VIC"}), false),
            (json!({"energy_rebate_enrolled": true}), false),
            (json!({}), false),
        ] {
            let mut c = CustomerContext::new("c-1");
            c.profile = profile.as_object().unwrap().clone();
            if converted {
                c.journeys.push(crate::context::JourneySummary {
                    journey: "energy_rebate".into(),
                    key: "c-1".into(),
                    status: crate::model::InstanceStatus::Converted,
                    mode: crate::model::Mode::Live,
                    started_at: chrono::Utc::now(),
                    ended_at: None,
                });
            }
            let e = event("customer.profile_updated", json!({}));
            assert!(agree(&rules, "energy_rebate", &e, &Arc::new(c)));
        }
    }

    fn script(body: &str) -> RuleSet {
        let text = format!(
            "fn journey() {{ #{{ name: \"t\", category: \"service\", triggers: [\"t.x\"],\n\
             steps: [#{{ id: \"a\", channel: \"push\", template: \"t\", delay: \"0s\" }}] }} }}\n\
             fn decide(event, customer) {{\n let d = event.data;\n {body}\n}}\n\
             fn twice(x) {{ x + x }}\n"
        );
        load_sources(vec![(PathBuf::from("t.rhai"), text)], &Limits::default()).unwrap()
    }

    /// Every operator over every pair of value types: where the compiled
    /// form answers, it answers as rhai does.
    #[test]
    fn operators_over_value_types_match_the_interpreter() {
        let values = [
            json!(null),
            json!(0),
            json!(1),
            json!(-7),
            json!(1.0),
            json!(0.1),
            json!(0.30000000000000004),
            json!(0.3),
            json!(1e20),
            json!(1e-20),
            json!(9223372036854775807i64),
            json!(18446744073709551615u64),
            json!(""),
            json!("a"),
            json!("b"),
            json!(true),
            json!(false),
            json!({"k": 1}),
            json!([1, "x"]),
        ];
        let exprs = [
            "d.a == d.b",
            "d.a != d.b",
            "d.a == ()",
            "() != d.b",
            "event == ()",
            "d.a < d.b",
            "d.a <= d.b",
            "d.a > d.b",
            "d.a >= d.b",
            "d.a + d.b",
            "d.a - d.b",
            "d.a * d.b",
            "d.a / d.b",
            "d.a && d.b",
            "d.a || d.b",
            "!d.a",
            "-d.a",
            "d.a ?? d.b",
            "`${d.a}/${d.b}`",
            "money(d.a)",
            "d.a in [1, \"a\", true, ()]",
            "d.b in d.a",
            "if d.a == () { skip(\"none\") } else { d.a }",
            "d.has(\"a\") && has(d, \"b\")",
            "d[\"a\"]",
            "d.a.k",
            "d.a?.k",
            "twice(d.a)",
            "d.has(\"a\") == has(d, \"a\")",
            "event.type + \"|\" + event.customer",
        ];
        let customer = Arc::new(CustomerContext::new("c-1"));
        let (mut decided, mut total) = (0, 0);
        for expr in exprs {
            let rules = script(&format!("start(#{{ v: {expr} }})"));
            let j = rules.journey("t").unwrap();
            assert!(j.compiled(), "{expr} should compile");
            for a in &values {
                for b in &values {
                    let e = event("t.x", json!({"a": a, "b": b}));
                    total += 1;
                    decided += agree(&rules, "t", &e, &customer) as usize;
                }
            }
        }
        // Most combinations are decided natively; the rest are rhai errors
        // or types left to it.
        eprintln!("compiled form decided {decided} of {total}");
        assert!(decided * 2 > total, "decided {decided} of {total}");
    }

    #[test]
    fn unsupported_constructs_leave_the_script_to_the_interpreter() {
        for body in [
            "let x = 0; for i in 0..3 { x += i; } start(#{ x: x })",
            "print(d.a); start()",
            "let f = |x| x + 1; start(#{ v: f.call(1) })",
            "start(#{ n: customer.journeys.len() })",
            "start(#{ v: d.a.twice() })",
        ] {
            let rules = script(body);
            assert!(!rules.journey("t").unwrap().compiled(), "{body}");
            // …and still decides, on the interpreter.
            let e = event("t.x", json!({"a": 1}));
            let c = Arc::new(CustomerContext::new("c-1"));
            let result = rules.decide(rules.journey("t").unwrap(), &e, &c);
            // (`twice` takes no `this`: that one is rhai's error to report.)
            if !body.contains(".twice()") {
                result.unwrap_or_else(|err| panic!("{body}: {err}"));
            }
        }
    }

    #[test]
    fn a_throw_or_a_runtime_error_gives_rhai_s_own_error() {
        let rules = script("if d.a == 1 { throw \"boom\" } start(#{ v: d.a + 1 })");
        let j = rules.journey("t").unwrap();
        assert!(j.compiled());
        let c = Arc::new(CustomerContext::new("c-1"));
        let err = rules
            .decide(j, &event("t.x", json!({"a": 1})), &c)
            .unwrap_err();
        assert!(err.message.contains("boom"), "{err}");
        let err = rules
            .decide(j, &event("t.x", json!({"a": [1]})), &c)
            .unwrap_err();
        assert!(err.line > 0, "the interpreter's position: {err:?}");
        assert_eq!(
            rules.decide(j, &event("t.x", json!({"a": 2})), &c).unwrap(),
            Decision::Start {
                key: None,
                vars: json!({"v": 3}).as_object().unwrap().clone()
            }
        );
    }
}
