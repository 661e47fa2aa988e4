//! The fleet query language: which devices a command, a rollout or a view is about.
//!
//! ```text
//! tag.region == "north" and online and metric.fuel < 0.2
//! ```
//!
//! A [`Query`] is parsed once and then evaluated against many devices through [`DeviceFacts`],
//! which the server implements over a device actor's live state. [`Query::reads`] says which
//! kinds of facts a query looks at, so a standing query is re-evaluated only when one of them
//! changes.
//!
//! # Grammar
//!
//! ```text
//! query      = or_expr EOF ;
//! or_expr    = and_expr { "or" and_expr } ;
//! and_expr   = not_expr { "and" not_expr } ;
//! not_expr   = "not" not_expr | atom ;
//! atom       = "(" or_expr ")" | "online" | "offline" | "true" | "false"
//!            | "id" cmp string
//!            | "group" ("==" | "!=") string           (* membership *)
//!            | field [ cmp literal | "exists" ] ;     (* bare field = field == true *)
//! field      = ("tag" | "attr" | "metric" | "reported" | "desired") "." path ;
//! path       = name { "." name } ;                    (* name = [A-Za-z0-9_:/-]+ or a "quoted string" *)
//! cmp        = "==" | "!=" | "<" | "<=" | ">" | ">=" | "~" ;   (* ~ = glob: * any run, ? one char *)
//! literal    = string | number | "true" | "false" ;
//! string     = '"' { char | '\"' | '\\' } '"' ;
//! number     = [ "-" ] digits [ "." digits ] [ ("e"|"E") [ "+"|"-" ] digits ] ;
//! ```
//!
//! - Keywords are lowercase and case-sensitive (`Online` is not `online`).
//! - Whitespace is free between tokens and not needed around operators and parentheses
//!   (`(online)and tag.region=="north"`). A field is one token: no whitespace inside
//!   `tag.region` or around its dots.
//! - `and` binds tighter than `or`, and `not` tighter than both: `a or b and c` is
//!   `a or (b and c)`, `not a and b` is `(not a) and b`.
//! - In a string, `\"` is a quote and `\\` a backslash; no other escapes exist, any other
//!   character (newlines included) stands for itself.
//! - A quoted name may hold any character but cannot be empty. For `attr`, `reported` and
//!   `desired` the path is a dotted path into a JSON document; for `tag` and `metric` the whole
//!   rest of the path is the tag key or metric name (`metric.engine.temp` is the metric
//!   `engine.temp`, as is `metric."engine.temp"`).
//! - A number without `.` and exponent from -2^63 to 2^64-1 (the range of 64-bit signed and
//!   unsigned integers) is an integer and compares exactly; any other number is a double, and
//!   one too large for a double is an error.
//! - Queries are at most [`MAX_QUERY_CHARS`] characters and nest at most [`MAX_NESTING`]
//!   levels of `(` and `not`.
//!
//! # Semantics
//!
//! - `online` / `offline`: the device's presence. `true` matches every device, `false` none.
//! - `id cmp "x"`: compares the device id as a string. `group == "g"`: the device is a member
//!   of `g`; `group != "g"`: it is not.
//! - A missing field makes every comparison false, `!=` too; `field exists` is true iff the
//!   field is present. Ask for absence with `not (field exists)` or `not (field == x)`.
//! - Numbers compare numerically and exactly across integers and doubles (`1 == 1.0`).
//! - Strings compare with `==`, `!=`, `~` and, by Unicode code point, with `<`, `<=`, `>`,
//!   `>=`.
//! - Booleans compare with `==` and `!=` only; `<`, `<=`, `>`, `>=` and `~` are false.
//! - A comparison between different types is false for every operator except `!=`, which is
//!   true: the value exists and is not equal.
//! - Tags are strings. A tag compared with a number compares numerically if the whole tag is a
//!   number in the syntax above (`"5"`, `"-2.5e3"`), else it is a type mismatch.
//! - A geo position (metric) supports only `exists`: comparisons are false, `!=` is true.
//! - A JSON value (attribute, reported or desired field): a number, string or bool behaves as
//!   above; `null`, an array or an object supports only `exists`, and comparing it is a type
//!   mismatch (false, `!=` true).
//! - `~` is a glob match on strings: `*` matches any run of characters, `?` exactly one, and
//!   the pattern must match the whole string. There is no escape: `*` and `?` in a pattern
//!   are always wildcards. `~` on anything but two strings is false.
//! - A bare field is `field == true`: `reported.door.open` means `reported.door.open == true`.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::fmt;

use crate::twin::Json;
use crate::value::Value;

/// Longest query accepted, in characters.
pub const MAX_QUERY_CHARS: usize = 4096;

/// Most nesting levels of `(` and `not` in a query.
pub const MAX_NESTING: usize = 64;

/// What a query can ask about one device. The server implements it over an actor's live state.
pub trait DeviceFacts {
    /// The device id.
    fn id(&self) -> &str;
    /// Whether the device is connected now.
    fn online(&self) -> bool;
    /// The value of a tag.
    fn tag(&self, key: &str) -> Option<&str>;
    /// A provisioned attribute (any JSON value); `path` is dotted for nested objects.
    fn attribute(&self, path: &str) -> Option<Json>;
    /// Whether the device is a member of `group`.
    fn in_group(&self, group: &str) -> bool;
    /// Last value of a telemetry metric.
    fn metric(&self, name: &str) -> Option<Value>;
    /// A field of the reported twin document, dotted path.
    fn reported(&self, path: &str) -> Option<Json>;
    /// A field of the desired twin document, dotted path.
    fn desired(&self, path: &str) -> Option<Json>;
}

/// A parsed query. `Display` prints a canonical form that parses back to an equal Query.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    expr: Expr,
}

/// Which kinds of device facts a query reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reads {
    /// `online` / `offline`.
    pub presence: bool,
    /// `tag.*`.
    pub tags: bool,
    /// `attr.*`.
    pub attributes: bool,
    /// `group`.
    pub groups: bool,
    /// `metric.*`.
    pub metrics: bool,
    /// `reported.*` and `desired.*`.
    pub twin: bool,
}

/// A parse error: where (0-based character offset into the source), what was expected, what was
/// found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("query error at column {}: expected {expected}, found {found}", .position + 1)]
pub struct QueryError {
    /// 0-based character offset into the source; the message shows it 1-based as the column.
    pub position: usize,
    /// What the parser expected there.
    pub expected: String,
    /// What it found: a token in backticks, or "end of query".
    pub found: String,
}

impl Query {
    /// Parses a query (see the [module documentation](crate::query) for the grammar).
    pub fn parse(source: &str) -> Result<Query, QueryError> {
        let len = source.chars().count();
        if len > MAX_QUERY_CHARS {
            return Err(QueryError {
                position: MAX_QUERY_CHARS,
                expected: format!("a query of at most {MAX_QUERY_CHARS} characters"),
                found: format!("{len} characters"),
            });
        }
        let mut parser = Parser::new(source);
        let expr = parser.or_expr()?;
        parser.skip_ws();
        if parser.peek().is_some() {
            return Err(parser.continuation_error(false));
        }
        Ok(Query { expr })
    }

    /// Whether `device` is selected by this query.
    pub fn matches(&self, device: &dyn DeviceFacts) -> bool {
        self.expr.eval(device)
    }

    /// Which kinds of facts it reads (to know when a standing query must be re-evaluated).
    pub fn reads(&self) -> Reads {
        let mut reads = Reads::default();
        self.expr.collect_reads(&mut reads);
        reads
    }

    /// The query that matches every device (`true`).
    pub fn all() -> Query {
        Query {
            expr: Expr::Const(true),
        }
    }
}

impl fmt::Display for Query {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.expr.fmt(f)
    }
}

impl std::str::FromStr for Query {
    type Err = QueryError;

    fn from_str(source: &str) -> Result<Self, QueryError> {
        Self::parse(source)
    }
}

// ---------------------------------------------------------------------------------------------
// Syntax tree

#[derive(Debug, Clone, PartialEq)]
enum Expr {
    /// `true` / `false`.
    Const(bool),
    /// `online` (true) / `offline` (false).
    Online(bool),
    Not(Box<Expr>),
    /// At least two operands; `a and (b and c)` keeps its inner group.
    And(Vec<Expr>),
    /// At least two operands.
    Or(Vec<Expr>),
    Id(Cmp, String),
    /// `group == g` (member) / `group != g`.
    Group {
        member: bool,
        group: String,
    },
    /// A bare field is parsed as `field == true`.
    Field(Field, Test),
}

#[derive(Debug, Clone, PartialEq)]
struct Field {
    source: Source,
    /// Tag key, metric name or dotted JSON path; never empty.
    path: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Tag,
    Attr,
    Metric,
    Reported,
    Desired,
}

impl Source {
    fn from_keyword(word: &str) -> Option<Self> {
        Some(match word {
            "tag" => Source::Tag,
            "attr" => Source::Attr,
            "metric" => Source::Metric,
            "reported" => Source::Reported,
            "desired" => Source::Desired,
            _ => return None,
        })
    }

    fn keyword(self) -> &'static str {
        match self {
            Source::Tag => "tag",
            Source::Attr => "attr",
            Source::Metric => "metric",
            Source::Reported => "reported",
            Source::Desired => "desired",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Test {
    Exists,
    Cmp(Cmp, Literal),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Glob,
}

impl Cmp {
    fn symbol(self) -> &'static str {
        match self {
            Cmp::Eq => "==",
            Cmp::Ne => "!=",
            Cmp::Lt => "<",
            Cmp::Le => "<=",
            Cmp::Gt => ">",
            Cmp::Ge => ">=",
            Cmp::Glob => "~",
        }
    }

    /// Whether an ordering comparison holds; `None` (incomparable, NaN) only satisfies `!=`.
    fn holds(self, ordering: Option<Ordering>) -> bool {
        let Some(o) = ordering else {
            return self == Cmp::Ne;
        };
        match self {
            Cmp::Eq => o == Ordering::Equal,
            Cmp::Ne => o != Ordering::Equal,
            Cmp::Lt => o == Ordering::Less,
            Cmp::Le => o != Ordering::Greater,
            Cmp::Gt => o == Ordering::Greater,
            Cmp::Ge => o != Ordering::Less,
            Cmp::Glob => false,
        }
    }
}

impl fmt::Display for Cmp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.symbol())
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Literal {
    Str(String),
    /// Within `i64::MIN..=u64::MAX`, the integers JSON and telemetry carry.
    Int(i128),
    /// Always finite.
    Double(f64),
    Bool(bool),
}

impl Literal {
    fn as_num(&self) -> Option<Num> {
        match *self {
            Literal::Int(i) => Some(Num::Int(i)),
            Literal::Double(d) => Some(Num::Float(d)),
            Literal::Str(_) | Literal::Bool(_) => None,
        }
    }
}

impl fmt::Display for Literal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Literal::Str(s) => write_string(f, s),
            Literal::Int(i) => write!(f, "{i}"),
            // Debug keeps a `.0` or an exponent, so the number reads back as a double
            Literal::Double(d) => write!(f, "{d:?}"),
            Literal::Bool(b) => write!(f, "{b}"),
        }
    }
}

fn write_string(f: &mut fmt::Formatter<'_>, s: &str) -> fmt::Result {
    f.write_str("\"")?;
    for c in s.chars() {
        if matches!(c, '"' | '\\') {
            f.write_str("\\")?;
        }
        write!(f, "{c}")?;
    }
    f.write_str("\"")
}

/// Writes a path bare when it reads back as the same path, else as one quoted name.
fn write_path(f: &mut fmt::Formatter<'_>, path: &str) -> fmt::Result {
    let bare = path
        .split('.')
        .all(|name| !name.is_empty() && name.chars().all(is_name_char));
    if bare {
        f.write_str(path)
    } else {
        write_string(f, path)
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Const(b) => write!(f, "{b}"),
            Expr::Online(true) => f.write_str("online"),
            Expr::Online(false) => f.write_str("offline"),
            Expr::Not(e) => {
                f.write_str("not ")?;
                write_operand(f, e, matches!(**e, Expr::And(_) | Expr::Or(_)))
            }
            Expr::And(operands) => {
                for (i, e) in operands.iter().enumerate() {
                    if i > 0 {
                        f.write_str(" and ")?;
                    }
                    write_operand(f, e, matches!(e, Expr::And(_) | Expr::Or(_)))?;
                }
                Ok(())
            }
            Expr::Or(operands) => {
                for (i, e) in operands.iter().enumerate() {
                    if i > 0 {
                        f.write_str(" or ")?;
                    }
                    write_operand(f, e, matches!(e, Expr::Or(_)))?;
                }
                Ok(())
            }
            Expr::Id(op, id) => {
                write!(f, "id {op} ")?;
                write_string(f, id)
            }
            Expr::Group { member, group } => {
                f.write_str(if *member { "group == " } else { "group != " })?;
                write_string(f, group)
            }
            Expr::Field(field, test) => {
                write!(f, "{}.", field.source.keyword())?;
                write_path(f, &field.path)?;
                match test {
                    Test::Exists => f.write_str(" exists"),
                    Test::Cmp(op, literal) => write!(f, " {op} {literal}"),
                }
            }
        }
    }
}

fn write_operand(f: &mut fmt::Formatter<'_>, e: &Expr, parenthesize: bool) -> fmt::Result {
    if parenthesize {
        write!(f, "({e})")
    } else {
        write!(f, "{e}")
    }
}

// ---------------------------------------------------------------------------------------------
// Evaluation

impl Expr {
    fn eval(&self, device: &dyn DeviceFacts) -> bool {
        match self {
            Expr::Const(b) => *b,
            Expr::Online(online) => device.online() == *online,
            Expr::Not(e) => !e.eval(device),
            Expr::And(operands) => operands.iter().all(|e| e.eval(device)),
            Expr::Or(operands) => operands.iter().any(|e| e.eval(device)),
            Expr::Id(op, id) => compare_strings(device.id(), *op, id),
            Expr::Group { member, group } => device.in_group(group) == *member,
            Expr::Field(field, Test::Exists) => field_fact(field, device, None).is_some(),
            Expr::Field(field, Test::Cmp(op, literal)) => field_fact(field, device, Some(literal))
                .is_some_and(|fact| compare(fact, *op, literal)),
        }
    }

    fn collect_reads(&self, reads: &mut Reads) {
        match self {
            Expr::Const(_) | Expr::Id(..) => {}
            Expr::Online(_) => reads.presence = true,
            Expr::Not(e) => e.collect_reads(reads),
            Expr::And(operands) | Expr::Or(operands) => {
                for e in operands {
                    e.collect_reads(reads);
                }
            }
            Expr::Group { .. } => reads.groups = true,
            Expr::Field(field, _) => match field.source {
                Source::Tag => reads.tags = true,
                Source::Attr => reads.attributes = true,
                Source::Metric => reads.metrics = true,
                Source::Reported | Source::Desired => reads.twin = true,
            },
        }
    }
}

/// A number from a device or a query: an integer in `i64::MIN..=u64::MAX`, or a double.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Num {
    Int(i128),
    Float(f64),
}

/// A device's value, reduced to what a comparison needs.
#[derive(Debug, Clone, PartialEq)]
enum Fact<'d> {
    Num(Num),
    Str(Cow<'d, str>),
    Bool(bool),
    /// Geo positions, JSON null, arrays and objects: only `exists`.
    Other,
}

impl From<Json> for Fact<'_> {
    fn from(json: Json) -> Self {
        match json {
            Json::Number(n) => {
                let num = if let Some(i) = n.as_i64() {
                    Some(Num::Int(i.into()))
                } else if let Some(u) = n.as_u64() {
                    Some(Num::Int(u.into()))
                } else {
                    n.as_f64().map(Num::Float)
                };
                num.map_or(Fact::Other, Fact::Num)
            }
            Json::String(s) => Fact::Str(Cow::Owned(s)),
            Json::Bool(b) => Fact::Bool(b),
            Json::Null | Json::Array(_) | Json::Object(_) => Fact::Other,
        }
    }
}

impl From<Value> for Fact<'_> {
    fn from(value: Value) -> Self {
        match value {
            Value::Double(d) => Fact::Num(Num::Float(d)),
            Value::Int(i) => Fact::Num(Num::Int(i.into())),
            Value::Bool(b) => Fact::Bool(b),
            Value::String(s) => Fact::Str(Cow::Owned(s)),
            Value::Geo(_) => Fact::Other,
        }
    }
}

/// The field's value on `device`; a tag compared with a number becomes a number if it is one.
fn field_fact<'d>(
    field: &Field,
    device: &'d dyn DeviceFacts,
    literal: Option<&Literal>,
) -> Option<Fact<'d>> {
    let path = field.path.as_str();
    match field.source {
        Source::Tag => device.tag(path).map(|tag| {
            let number = literal
                .and_then(Literal::as_num)
                .and_then(|_| parse_tag_number(tag));
            number.map_or(Fact::Str(Cow::Borrowed(tag)), Fact::Num)
        }),
        Source::Attr => device.attribute(path).map(Fact::from),
        Source::Metric => device.metric(path).map(Fact::from),
        Source::Reported => device.reported(path).map(Fact::from),
        Source::Desired => device.desired(path).map(Fact::from),
    }
}

/// A tag that is a number in the query syntax, as a whole.
fn parse_tag_number(tag: &str) -> Option<Num> {
    let chars: Vec<char> = tag.chars().collect();
    match scan_number(&chars, 0) {
        Ok((end, literal)) if end == chars.len() => literal.as_num(),
        _ => None,
    }
}

/// One comparison of a present value (see the semantics in the module documentation).
fn compare(fact: Fact<'_>, op: Cmp, literal: &Literal) -> bool {
    match (fact, literal) {
        (Fact::Num(a), Literal::Int(_) | Literal::Double(_)) => literal
            .as_num()
            .is_some_and(|b| op.holds(compare_num(a, b))),
        (Fact::Str(a), Literal::Str(b)) => compare_strings(&a, op, b),
        (Fact::Bool(a), Literal::Bool(b)) => match op {
            Cmp::Eq => a == *b,
            Cmp::Ne => a != *b,
            _ => false,
        },
        // a type mismatch: the value exists and is not equal
        _ => op == Cmp::Ne,
    }
}

/// Strings: equality, glob, and order by Unicode code point (the byte order of UTF-8).
fn compare_strings(a: &str, op: Cmp, b: &str) -> bool {
    match op {
        Cmp::Glob => glob_match(a, b),
        _ => op.holds(Some(a.cmp(b))),
    }
}

/// Exact numeric order of two numbers; `None` if one is NaN.
fn compare_num(a: Num, b: Num) -> Option<Ordering> {
    match (a, b) {
        (Num::Int(x), Num::Int(y)) => Some(x.cmp(&y)),
        (Num::Float(x), Num::Float(y)) => x.partial_cmp(&y),
        (Num::Int(x), Num::Float(y)) => compare_int_float(x, y),
        (Num::Float(x), Num::Int(y)) => compare_int_float(y, x).map(Ordering::reverse),
    }
}

/// Exact order of an integer (|i| < 2^64, from i64 or u64) and a double, without rounding the
/// integer to a double.
fn compare_int_float(i: i128, f: f64) -> Option<Ordering> {
    /// 2^65: beyond every integer we compare, and every double below it truncates exactly.
    const BOUND: f64 = 36_893_488_147_419_103_232.0;
    if f.is_nan() {
        return None;
    }
    if f >= BOUND {
        return Some(Ordering::Less);
    }
    if f <= -BOUND {
        return Some(Ordering::Greater);
    }
    let whole = f.trunc();
    // exact: `whole` is an integer of magnitude below 2^65
    let whole_int = whole as i128;
    Some(i.cmp(&whole_int).then_with(|| {
        let fraction = f - whole;
        if fraction > 0.0 {
            Ordering::Less
        } else if fraction < 0.0 {
            Ordering::Greater
        } else {
            Ordering::Equal
        }
    }))
}

/// Whole-string glob match: `*` any run of characters, `?` exactly one. Linear backtracking over
/// the last `*`, so no pattern can make it exponential.
fn glob_match(text: &str, pattern: &str) -> bool {
    let text: Vec<char> = text.chars().collect();
    let pattern: Vec<char> = pattern.chars().collect();
    let (mut t, mut p) = (0, 0);
    // after the last `*` seen: (pattern index after it, text index it matched up to)
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some('*') => {
                p += 1;
                star = Some((p, t));
            }
            Some(&c) if c == '?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((after_star, matched)) => {
                    p = after_star;
                    t = matched + 1;
                    star = Some((after_star, matched + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == '*')
}

// ---------------------------------------------------------------------------------------------
// Parsing

const EXPECTED_EXPRESSION: &str = "an expression (online, offline, not, (, tag., attr., ...)";
const EXPECTED_CMP: &str = "a comparison (==, !=, <, <=, >, >=, ~)";
const EXPECTED_NAME: &str = "a name ([A-Za-z0-9_:/-] or a \"quoted string\")";
const EXPECTED_LITERAL: &str = "a value (a \"string\", a number, true or false)";
/// Longest token quoted in an error, in characters.
const MAX_FOUND_CHARS: usize = 40;

/// Characters of keywords and bare names.
fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '/' | '-')
}

/// Scans a number at `start`: `(end, literal)`, or `(position, expected)` where it is malformed.
fn scan_number(s: &[char], start: usize) -> Result<(usize, Literal), (usize, &'static str)> {
    let digits_from = |from: usize| {
        let mut end = from;
        while s.get(end).is_some_and(char::is_ascii_digit) {
            end += 1;
        }
        end
    };
    let mut i = start;
    if s.get(i) == Some(&'-') {
        i += 1;
    }
    let end = digits_from(i);
    if end == i {
        return Err((i, "digits"));
    }
    i = end;
    let mut integer = true;
    if s.get(i) == Some(&'.') {
        let end = digits_from(i + 1);
        if end == i + 1 {
            return Err((i + 1, "digits after `.`"));
        }
        i = end;
        integer = false;
    }
    if matches!(s.get(i), Some('e' | 'E')) {
        let mut from = i + 1;
        if matches!(s.get(from), Some('+' | '-')) {
            from += 1;
        }
        let end = digits_from(from);
        if end == from {
            return Err((from, "digits in the exponent"));
        }
        i = end;
        integer = false;
    }
    let text: String = s[start..i].iter().collect();
    if integer
        && let Ok(n) = text.parse::<i128>()
        && (i128::from(i64::MIN)..=i128::from(u64::MAX)).contains(&n)
    {
        return Ok((i, Literal::Int(n)));
    }
    match text.parse::<f64>() {
        Ok(d) if d.is_finite() => Ok((i, Literal::Double(d))),
        _ => Err((start, "a finite number")),
    }
}

/// A string opened at `open` and never closed.
fn unterminated(open: usize) -> QueryError {
    QueryError {
        position: open,
        expected: "a closing \"".to_owned(),
        found: "end of query".to_owned(),
    }
}

/// A recursive-descent parser over characters (positions are character offsets).
struct Parser {
    src: Vec<char>,
    pos: usize,
    /// Open `(` and `not` around the current position.
    depth: usize,
    /// Whether the last atom was a bare field, so a comparison could have followed it.
    after_bare_field: bool,
}

impl Parser {
    fn new(source: &str) -> Self {
        Self {
            src: source.chars().collect(),
            pos: 0,
            depth: 0,
            after_bare_field: false,
        }
    }

    fn peek(&self) -> Option<char> {
        self.src.get(self.pos).copied()
    }

    fn peek_at(&self, offset: usize) -> Option<char> {
        self.src.get(self.pos + offset).copied()
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
    }

    /// End of the run of name characters starting at `from`.
    fn name_end(&self, from: usize) -> usize {
        let mut end = from;
        while self.src.get(end).copied().is_some_and(is_name_char) {
            end += 1;
        }
        end
    }

    /// Whether the word at the current position (after whitespace) is `word`.
    fn at_word(&mut self, word: &str) -> bool {
        self.skip_ws();
        let end = self.name_end(self.pos);
        self.src[self.pos..end].iter().copied().eq(word.chars())
    }

    /// Consumes `word` if it is next.
    fn eat_word(&mut self, word: &str) -> bool {
        let found = self.at_word(word);
        if found {
            self.pos += word.chars().count();
        }
        found
    }

    fn error(&self, position: usize, expected: impl Into<String>) -> QueryError {
        QueryError {
            position,
            expected: expected.into(),
            found: self.found_at(position),
        }
    }

    /// Describes the token at `position` for an error: "end of query", "whitespace" or the
    /// token in backticks.
    fn found_at(&self, position: usize) -> String {
        let Some(&first) = self.src.get(position) else {
            return "end of query".to_owned();
        };
        let run = |accept: fn(char) -> bool| {
            let mut end = position;
            while self.src.get(end).copied().is_some_and(accept) {
                end += 1;
            }
            end
        };
        let end = if first.is_whitespace() {
            return "whitespace".to_owned();
        } else if is_name_char(first) || matches!(first, '.' | '+') {
            run(|c| is_name_char(c) || matches!(c, '.' | '+'))
        } else if matches!(first, '=' | '!' | '<' | '>' | '~') {
            run(|c| matches!(c, '=' | '!' | '<' | '>' | '~'))
        } else if first == '"' {
            let mut end = position + 1;
            while let Some(&c) = self.src.get(end) {
                end += if c == '\\' { 2 } else { 1 };
                if c == '"' {
                    break;
                }
            }
            end.min(self.src.len())
        } else {
            position + 1
        };
        let mut token = String::new();
        for &c in self.src[position..end].iter().take(MAX_FOUND_CHARS) {
            if c.is_control() {
                token.extend(c.escape_default());
            } else {
                token.push(c);
            }
        }
        if end - position > MAX_FOUND_CHARS {
            token.push_str("...");
        }
        format!("`{token}`")
    }

    /// The error for a token that cannot continue the expression before it.
    fn continuation_error(&self, in_parens: bool) -> QueryError {
        let end = if in_parens {
            "`and`/`or`/`)`"
        } else {
            "`and`/`or`/end"
        };
        let expected = if self.after_bare_field {
            format!("{EXPECTED_CMP} or `exists` or {end}")
        } else {
            end.to_owned()
        };
        self.error(self.pos, expected)
    }

    /// Enters a `(` or `not` at `at`, enforcing [`MAX_NESTING`].
    fn enter(&mut self, at: usize) -> Result<(), QueryError> {
        if self.depth >= MAX_NESTING {
            return Err(self.error(
                at,
                format!("at most {MAX_NESTING} nested levels of `(` and `not`"),
            ));
        }
        self.depth += 1;
        Ok(())
    }

    fn or_expr(&mut self) -> Result<Expr, QueryError> {
        let mut operands = vec![self.and_expr()?];
        while self.eat_word("or") {
            operands.push(self.and_expr()?);
        }
        Ok(if operands.len() == 1 {
            operands.swap_remove(0)
        } else {
            Expr::Or(operands)
        })
    }

    fn and_expr(&mut self) -> Result<Expr, QueryError> {
        let mut operands = vec![self.not_expr()?];
        while self.eat_word("and") {
            operands.push(self.not_expr()?);
        }
        Ok(if operands.len() == 1 {
            operands.swap_remove(0)
        } else {
            Expr::And(operands)
        })
    }

    fn not_expr(&mut self) -> Result<Expr, QueryError> {
        if self.at_word("not") {
            self.enter(self.pos)?;
            self.pos += 3;
            let operand = self.not_expr()?;
            self.depth -= 1;
            return Ok(Expr::Not(Box::new(operand)));
        }
        self.atom()
    }

    fn atom(&mut self) -> Result<Expr, QueryError> {
        self.skip_ws();
        self.after_bare_field = false;
        let start = self.pos;
        match self.peek() {
            None => return Err(self.error(start, "an expression")),
            Some('(') => {
                self.enter(start)?;
                self.pos += 1;
                let inner = self.or_expr()?;
                self.skip_ws();
                if self.peek() != Some(')') {
                    return Err(self.continuation_error(true));
                }
                self.pos += 1;
                self.depth -= 1;
                self.after_bare_field = false;
                return Ok(inner);
            }
            Some(_) => {}
        }
        let end = self.name_end(start);
        let word: String = self.src[start..end].iter().collect();
        let expr = match word.as_str() {
            "online" => Expr::Online(true),
            "offline" => Expr::Online(false),
            "true" => Expr::Const(true),
            "false" => Expr::Const(false),
            "id" => {
                self.pos = end;
                self.skip_ws();
                let Some(op) = self.cmp() else {
                    return Err(self.error(self.pos, EXPECTED_CMP));
                };
                return Ok(Expr::Id(op, self.string_operand()?));
            }
            "group" => {
                self.pos = end;
                self.skip_ws();
                let at = self.pos;
                let member = match self.cmp() {
                    Some(Cmp::Eq) => true,
                    Some(Cmp::Ne) => false,
                    _ => return Err(self.error(at, "`==` or `!=`")),
                };
                return Ok(Expr::Group {
                    member,
                    group: self.string_operand()?,
                });
            }
            _ => match Source::from_keyword(&word) {
                Some(source) => {
                    self.pos = end;
                    return self.field(source);
                }
                None => return Err(self.error(start, EXPECTED_EXPRESSION)),
            },
        };
        self.pos = end;
        Ok(expr)
    }

    /// A field after its keyword, and its test.
    fn field(&mut self, source: Source) -> Result<Expr, QueryError> {
        if self.peek() != Some('.') {
            return Err(self.error(
                self.pos,
                format!("`.` and a name after `{}`", source.keyword()),
            ));
        }
        let mut path = String::new();
        while self.peek() == Some('.') {
            self.pos += 1;
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(&self.name()?);
        }
        let field = Field { source, path };
        self.skip_ws();
        if let Some(op) = self.cmp() {
            let literal = self.literal()?;
            return Ok(Expr::Field(field, Test::Cmp(op, literal)));
        }
        if self.eat_word("exists") {
            return Ok(Expr::Field(field, Test::Exists));
        }
        self.after_bare_field = true;
        Ok(Expr::Field(field, Test::Cmp(Cmp::Eq, Literal::Bool(true))))
    }

    /// One name of a path: bare or quoted, never empty.
    fn name(&mut self) -> Result<String, QueryError> {
        let start = self.pos;
        if self.peek() == Some('"') {
            let name = self.string()?;
            if name.is_empty() {
                return Err(self.error(start, "a non-empty name"));
            }
            return Ok(name);
        }
        let end = self.name_end(start);
        if end == start {
            return Err(self.error(start, EXPECTED_NAME));
        }
        self.pos = end;
        Ok(self.src[start..end].iter().collect())
    }

    /// A comparison operator, if one is next (no whitespace skipped).
    fn cmp(&mut self) -> Option<Cmp> {
        let (op, len) = match (self.peek()?, self.peek_at(1)) {
            ('=', Some('=')) => (Cmp::Eq, 2),
            ('!', Some('=')) => (Cmp::Ne, 2),
            ('<', Some('=')) => (Cmp::Le, 2),
            ('<', _) => (Cmp::Lt, 1),
            ('>', Some('=')) => (Cmp::Ge, 2),
            ('>', _) => (Cmp::Gt, 1),
            ('~', _) => (Cmp::Glob, 1),
            _ => return None,
        };
        self.pos += len;
        Some(op)
    }

    /// A quoted string after `id` or `group` and their operator.
    fn string_operand(&mut self) -> Result<String, QueryError> {
        self.skip_ws();
        if self.peek() != Some('"') {
            return Err(self.error(self.pos, "a \"quoted string\""));
        }
        self.string()
    }

    fn literal(&mut self) -> Result<Literal, QueryError> {
        self.skip_ws();
        let start = self.pos;
        match self.peek() {
            Some('"') => return self.string().map(Literal::Str),
            Some(c) if c == '-' || c.is_ascii_digit() => {
                return match scan_number(&self.src, start) {
                    Ok((end, literal)) => {
                        self.pos = end;
                        Ok(literal)
                    }
                    Err((position, expected)) => Err(self.error(position, expected)),
                };
            }
            _ => {}
        }
        let end = self.name_end(start);
        let literal = match self.src[start..end].iter().collect::<String>().as_str() {
            "true" => Literal::Bool(true),
            "false" => Literal::Bool(false),
            _ => return Err(self.error(start, EXPECTED_LITERAL)),
        };
        self.pos = end;
        Ok(literal)
    }

    /// A string literal at the current `"`.
    fn string(&mut self) -> Result<String, QueryError> {
        let open = self.pos;
        self.pos += 1;
        let mut out = String::new();
        loop {
            match self.peek() {
                None => return Err(unterminated(open)),
                Some('"') => {
                    self.pos += 1;
                    return Ok(out);
                }
                Some('\\') => match self.peek_at(1) {
                    Some(c @ ('"' | '\\')) => {
                        out.push(c);
                        self.pos += 2;
                    }
                    None => return Err(unterminated(open)),
                    Some(c) => {
                        return Err(QueryError {
                            position: self.pos,
                            expected: "`\\\"` or `\\\\` after a backslash".to_owned(),
                            found: format!("`\\{}`", c.escape_default()),
                        });
                    }
                },
                Some(c) => {
                    out.push(c);
                    self.pos += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::GeoPosition;
    use proptest::prelude::*;
    use serde_json::json;
    use std::collections::{BTreeMap, BTreeSet};

    /// A device over plain maps.
    #[derive(Debug, Clone, Default)]
    struct Fixture {
        id: String,
        online: bool,
        tags: BTreeMap<String, String>,
        attributes: Json,
        groups: BTreeSet<String>,
        metrics: BTreeMap<String, Value>,
        reported: Json,
        desired: Json,
    }

    fn json_at(doc: &Json, path: &str) -> Option<Json> {
        let mut at = doc;
        for name in path.split('.') {
            at = at.as_object()?.get(name)?;
        }
        Some(at.clone())
    }

    impl DeviceFacts for Fixture {
        fn id(&self) -> &str {
            &self.id
        }
        fn online(&self) -> bool {
            self.online
        }
        fn tag(&self, key: &str) -> Option<&str> {
            self.tags.get(key).map(String::as_str)
        }
        fn attribute(&self, path: &str) -> Option<Json> {
            json_at(&self.attributes, path)
        }
        fn in_group(&self, group: &str) -> bool {
            self.groups.contains(group)
        }
        fn metric(&self, name: &str) -> Option<Value> {
            self.metrics.get(name).cloned()
        }
        fn reported(&self, path: &str) -> Option<Json> {
            json_at(&self.reported, path)
        }
        fn desired(&self, path: &str) -> Option<Json> {
            json_at(&self.desired, path)
        }
    }

    fn geo() -> Value {
        Value::Geo(GeoPosition {
            lat: 52.5,
            lon: 13.4,
            alt_m: None,
            speed_mps: None,
            heading_deg: None,
            accuracy_m: None,
        })
    }

    /// A truck in the north with a bit of everything.
    fn truck() -> Fixture {
        Fixture {
            id: "truck-7".into(),
            online: true,
            tags: [
                ("region", "north"),
                ("model", "x:1/a-b"),
                ("axles", "3"),
                ("weight", "7.5e3"),
                ("odd key", "yes"),
                ("a.b", "dotted"),
            ]
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect(),
            attributes: json!({
                "hw": {"rev": 4, "vendor": "acme"},
                "big": 18_446_744_073_709_551_615u64,
                "none": null,
                "list": [1, 2],
                "leased": true,
            }),
            groups: ["fleet-a".to_owned()].into(),
            metrics: [
                ("fuel", Value::Double(0.15)),
                ("engine.temp", Value::Int(90)),
                ("door", Value::Bool(true)),
                ("driver", Value::String("Ann".into())),
                ("pos", geo()),
            ]
            .into_iter()
            .map(|(k, v)| (k.into(), v))
            .collect(),
            reported: json!({"fw": "1.2.3", "door": {"open": true}, "rpm": 1200.0}),
            desired: json!({"fw": "1.3.0"}),
        }
    }

    fn q(source: &str) -> Query {
        Query::parse(source).unwrap_or_else(|e| panic!("{source:?}: {e}"))
    }

    fn err(source: &str) -> QueryError {
        Query::parse(source).expect_err(source)
    }

    fn matches(source: &str) -> bool {
        q(source).matches(&truck())
    }

    // --- grammar ---------------------------------------------------------------------------

    #[test]
    fn every_construct_parses_and_prints_canonically() {
        let cases = [
            ("online", "online"),
            ("offline", "offline"),
            ("true", "true"),
            ("false", "false"),
            ("not online", "not online"),
            ("not not online", "not not online"),
            ("(online)", "online"),
            ("((online))", "online"),
            ("id == \"truck-7\"", "id == \"truck-7\""),
            ("id~\"truck-*\"", "id ~ \"truck-*\""),
            ("group == \"fleet-a\"", "group == \"fleet-a\""),
            ("group!=\"fleet-a\"", "group != \"fleet-a\""),
            ("tag.region == \"north\"", "tag.region == \"north\""),
            ("tag.region", "tag.region == true"),
            ("tag.region exists", "tag.region exists"),
            ("attr.hw.rev >= 4", "attr.hw.rev >= 4"),
            ("metric.fuel < 0.2", "metric.fuel < 0.2"),
            (
                "metric.engine.temp > -1.5e3",
                "metric.engine.temp > -1500.0",
            ),
            ("reported.door.open", "reported.door.open == true"),
            ("desired.fw != \"1.2\"", "desired.fw != \"1.2\""),
            ("metric.x <= 1E+2", "metric.x <= 100.0"),
            ("metric.x == 007", "metric.x == 7"),
            ("metric.x == -0", "metric.x == 0"),
            ("metric.x == 2.0", "metric.x == 2.0"),
            ("metric.x == 1e20", "metric.x == 1e20"),
            (
                "metric.x == 99999999999999999999",
                "metric.x == 1e20", // beyond u64: a double
            ),
            (
                "metric.x == 18446744073709551615",
                "metric.x == 18446744073709551615", // u64::MAX: still an integer
            ),
            (
                "metric.x == -9223372036854775808",
                "metric.x == -9223372036854775808",
            ),
            (
                "metric.x == -9223372036854775809",
                "metric.x == -9.223372036854776e18",
            ),
            ("tag.x == false", "tag.x == false"),
            (
                "tag.\"odd key\" == \"a\\\"b\\\\c\"",
                "tag.\"odd key\" == \"a\\\"b\\\\c\"",
            ),
            ("tag.\"a.b\"", "tag.a.b == true"),
            ("attr.hw.\"rev\" == 4", "attr.hw.rev == 4"),
            ("attr.\"x y\".z exists", "attr.\"x y.z\" exists"),
            ("tag.x == \"multi\nline\"", "tag.x == \"multi\nline\""),
            ("tag.\"é\" == 1", "tag.\"é\" == 1"),
            (
                "online and tag.a or offline",
                "online and tag.a == true or offline",
            ),
        ];
        for (source, canonical) in cases {
            let parsed = Query::parse(source);
            let query = parsed.unwrap_or_else(|e| panic!("{source:?}: {e}"));
            assert_eq!(query.to_string(), canonical, "{source:?}");
            assert_eq!(q(canonical), query, "{canonical:?}");
        }
    }

    #[test]
    fn whitespace_is_free_between_tokens() {
        let spaced = q(" ( online )\tand\n tag.region  ==  \"north\"  or not  offline ");
        let tight = q("(online)and tag.region==\"north\"or not offline");
        assert_eq!(spaced, tight);
        assert_eq!(
            tight.to_string(),
            "online and tag.region == \"north\" or not offline"
        );
    }

    #[test]
    fn metric_and_tag_names_take_the_whole_rest_of_the_path() {
        assert_eq!(q("metric.engine.temp"), q("metric.\"engine.temp\""));
        assert!(matches("metric.engine.temp == 90"));
        assert!(matches("tag.a.b == \"dotted\""));
        assert!(matches("tag.\"a.b\" == \"dotted\""));
        assert!(matches("metric.\"engine\".temp == 90"));
    }

    #[test]
    fn precedence_and_grouping() {
        assert_eq!(
            q("online or offline and true"),
            q("online or (offline and true)")
        );
        assert_ne!(
            q("online or offline and true"),
            q("(online or offline) and true")
        );
        assert_eq!(q("not online and offline"), q("(not online) and offline"));
        assert_ne!(q("not online and offline"), q("not (online and offline)"));
        assert_eq!(
            q("online and offline and true").to_string(),
            "online and offline and true"
        );
        assert_eq!(
            q("online and (offline and true)").to_string(),
            "online and (offline and true)"
        );
        assert_eq!(
            q("(online or offline) and true").to_string(),
            "(online or offline) and true"
        );
        assert_eq!(
            q("not (online or offline)").to_string(),
            "not (online or offline)"
        );
        assert_eq!(
            q("(online and offline) or true").to_string(),
            "online and offline or true"
        );
        // evaluation agrees: `true or false and false` is true only if `and` binds tighter
        assert!(matches("true or false and false"));
        assert!(!matches("(true or false) and false"));
        assert!(matches("not false and true"));
        assert!(!matches("not (false and true) and false"));
    }

    #[test]
    fn keywords_are_case_sensitive_words() {
        assert_eq!(err("Online").found, "`Online`");
        assert_eq!(err("online AND offline").found, "`AND`");
        assert_eq!(err("online andx offline").found, "`andx`");
        assert_eq!(err("notonline").found, "`notonline`");
        // keywords are fine as names inside a path
        assert!(Query::parse("tag.and == \"or\" and attr.not.online exists").is_ok());
    }

    // --- errors ----------------------------------------------------------------------------

    /// (source, column (1-based), expected, found)
    #[test]
    fn errors_say_where_what_was_expected_and_what_was_found() {
        let expression = EXPECTED_EXPRESSION;
        let cases: &[(&str, usize, &str, &str)] = &[
            (
                "tag.region = \"north\"",
                12,
                "a comparison (==, !=, <, <=, >, >=, ~) or `exists` or `and`/`or`/end",
                "`=`",
            ),
            ("tag.region == \"north", 15, "a closing \"", "end of query"),
            ("online and", 11, "an expression", "end of query"),
            ("", 1, "an expression", "end of query"),
            ("   ", 4, "an expression", "end of query"),
            ("onlin", 1, expression, "`onlin`"),
            ("online and onlin", 12, expression, "`onlin`"),
            ("()", 2, expression, "`)`"),
            ("not", 4, "an expression", "end of query"),
            ("online offline", 8, "`and`/`or`/end", "`offline`"),
            ("online)", 7, "`and`/`or`/end", "`)`"),
            ("(online", 8, "`and`/`or`/`)`", "end of query"),
            ("(online offline)", 9, "`and`/`or`/`)`", "`offline`"),
            (
                "(tag.a =< 1)",
                8,
                "a comparison (==, !=, <, <=, >, >=, ~) or `exists` or `and`/`or`/`)`",
                "`=<`",
            ),
            ("(tag.a) = 1", 9, "`and`/`or`/end", "`=`"),
            (
                "tag.a existsx",
                7,
                "a comparison (==, !=, <, <=, >, >=, ~) or `exists` or `and`/`or`/end",
                "`existsx`",
            ),
            ("tag.a == 1 2", 12, "`and`/`or`/end", "`2`"),
            ("online \"x\"", 8, "`and`/`or`/end", "`\"x\"`"),
            ("tag == 1", 4, "`.` and a name after `tag`", "whitespace"),
            ("attr", 5, "`.` and a name after `attr`", "end of query"),
            ("metric.", 8, EXPECTED_NAME, "end of query"),
            ("reported.a. == 1", 12, EXPECTED_NAME, "whitespace"),
            ("desired.a.==1", 11, EXPECTED_NAME, "`==`"),
            ("tag.\"\" == 1", 5, "a non-empty name", "`\"\"`"),
            ("tag.\"abc", 5, "a closing \"", "end of query"),
            ("tag.a == ", 10, EXPECTED_LITERAL, "end of query"),
            ("tag.a == north", 10, EXPECTED_LITERAL, "`north`"),
            ("tag.a == True", 10, EXPECTED_LITERAL, "`True`"),
            ("tag.a == -x", 11, "digits", "`x`"),
            ("tag.a == -", 11, "digits", "end of query"),
            ("tag.a == 1.", 12, "digits after `.`", "end of query"),
            ("tag.a == 1.e5", 12, "digits after `.`", "`e5`"),
            ("tag.a == 1e", 12, "digits in the exponent", "end of query"),
            ("tag.a == 1e+", 13, "digits in the exponent", "end of query"),
            ("tag.a == 1e999", 10, "a finite number", "`1e999`"),
            (
                "tag.a == -1e999 and online",
                10,
                "a finite number",
                "`-1e999`",
            ),
            (
                "tag.a == \"x\\n\"",
                12,
                "`\\\"` or `\\\\` after a backslash",
                "`\\n`",
            ),
            ("tag.a == \"x\\", 10, "a closing \"", "end of query"),
            (
                "id \"x\"",
                4,
                "a comparison (==, !=, <, <=, >, >=, ~)",
                "`\"x\"`",
            ),
            ("id == x", 7, "a \"quoted string\"", "`x`"),
            ("id == 5", 7, "a \"quoted string\"", "`5`"),
            ("group < \"g\"", 7, "`==` or `!=`", "`<`"),
            ("group", 6, "`==` or `!=`", "end of query"),
            ("group == g", 10, "a \"quoted string\"", "`g`"),
            ("online & offline", 8, "`and`/`or`/end", "`&`"),
            ("online and\u{1}", 11, expression, "`\\u{1}`"),
        ];
        for &(source, column, expected, found) in cases {
            let e = err(source);
            assert_eq!(
                (e.position + 1, e.expected.as_str(), e.found.as_str()),
                (column, expected, found),
                "{source:?}"
            );
        }
    }

    #[test]
    fn error_messages_read_as_in_the_docs() {
        assert_eq!(
            err("tag.region = \"north\"").to_string(),
            "query error at column 12: expected a comparison (==, !=, <, <=, >, >=, ~) or `exists` or `and`/`or`/end, found `=`"
        );
        assert_eq!(
            err("tag.region == \"north").to_string(),
            "query error at column 15: expected a closing \", found end of query"
        );
        assert_eq!(
            err("online and").to_string(),
            "query error at column 11: expected an expression, found end of query"
        );
        assert_eq!(
            err("onlin").to_string(),
            "query error at column 1: expected an expression (online, offline, not, (, tag., attr., ...), found `onlin`"
        );
    }

    #[test]
    fn positions_count_characters_not_bytes() {
        let e = err("tag.\"é\" == \"ü = ok\" and é");
        assert_eq!(e.position, 24);
        assert_eq!(e.found, "`é`");
    }

    #[test]
    fn long_tokens_are_cut_in_errors() {
        let word = "x".repeat(100);
        let e = err(&format!("online {word}"));
        assert_eq!(e.found, format!("`{}...`", "x".repeat(MAX_FOUND_CHARS)));
    }

    #[test]
    fn nesting_is_limited() {
        let ok = format!(
            "{}online{}",
            "(".repeat(MAX_NESTING),
            ")".repeat(MAX_NESTING)
        );
        assert!(Query::parse(&ok).is_ok());
        let deep = format!(
            "{}online{}",
            "(".repeat(MAX_NESTING + 1),
            ")".repeat(MAX_NESTING + 1)
        );
        let e = err(&deep);
        assert_eq!(e.position, MAX_NESTING);
        assert_eq!(e.expected, "at most 64 nested levels of `(` and `not`");
        assert_eq!(e.found, "`(`");

        assert!(Query::parse(&format!("{}online", "not ".repeat(MAX_NESTING))).is_ok());
        let e = err(&format!("{}online", "not ".repeat(MAX_NESTING + 1)));
        assert_eq!((e.position, e.found.as_str()), (4 * MAX_NESTING, "`not`"));

        // both count together; siblings do not
        let mixed = format!("{}online{}", "not (".repeat(32), ")".repeat(32));
        assert!(Query::parse(&mixed).is_ok());
        let mixed = format!("{}online{}", "not (".repeat(33), ")".repeat(33));
        assert_eq!(err(&mixed).position, 5 * 32);
        let wide = vec!["(online)"; 300].join(" or ");
        assert!(wide.chars().count() <= MAX_QUERY_CHARS);
        assert!(Query::parse(&wide).is_ok());
    }

    #[test]
    fn length_is_limited() {
        let ok = format!("online{}", " ".repeat(MAX_QUERY_CHARS - 6));
        assert!(Query::parse(&ok).is_ok());
        let long = format!("online{}", " ".repeat(MAX_QUERY_CHARS - 5));
        let e = err(&long);
        assert_eq!(
            e.to_string(),
            "query error at column 4097: expected a query of at most 4096 characters, found 4097 characters"
        );
        // characters, not bytes
        let wide = format!("tag.x == \"{}\"", "é".repeat(MAX_QUERY_CHARS - 11));
        assert!(Query::parse(&wide).is_ok());
    }

    // --- semantics -------------------------------------------------------------------------

    #[test]
    fn presence_constants_id_and_groups() {
        let mut d = truck();
        assert!(q("online").matches(&d));
        assert!(!q("offline").matches(&d));
        d.online = false;
        assert!(!q("online").matches(&d));
        assert!(q("offline").matches(&d));
        assert!(q("true").matches(&d));
        assert!(!q("false").matches(&d));
        assert!(Query::all().matches(&d));
        assert_eq!(Query::all(), q("true"));

        for (query, expected) in [
            ("id == \"truck-7\"", true),
            ("id != \"truck-7\"", false),
            ("id ~ \"truck-?\"", true),
            ("id ~ \"truck\"", false),
            ("id < \"truck-8\"", true),
            ("id >= \"u\"", false),
            ("group == \"fleet-a\"", true),
            ("group != \"fleet-a\"", false),
            ("group == \"fleet-b\"", false),
            ("group != \"fleet-b\"", true),
        ] {
            assert_eq!(matches(query), expected, "{query}");
        }
    }

    /// The table of the module documentation.
    #[test]
    fn comparison_semantics() {
        let cases = [
            // missing fields: every comparison false, != too; exists false
            ("tag.nope == \"x\"", false),
            ("tag.nope != \"x\"", false),
            ("tag.nope", false),
            ("tag.nope exists", false),
            ("not (tag.nope exists)", true),
            ("metric.nope != 1", false),
            ("attr.hw.nope != 1", false),
            ("attr.hw.rev.deeper exists", false),
            // numbers across int and double
            ("metric.fuel < 0.2", true),
            ("metric.fuel > 0", true),
            ("metric.fuel == 0.15", true),
            ("metric.fuel >= 1", false),
            ("metric.engine.temp == 90.0", true),
            ("metric.engine.temp <= 90", true),
            ("metric.engine.temp < 90.5", true),
            ("metric.engine.temp > 89.999", true),
            ("metric.engine.temp != 90", false),
            ("reported.rpm == 1200", true),
            ("reported.rpm > 1199", true),
            ("attr.big == 18446744073709551615", true), // u64::MAX, exactly
            ("attr.big > 9223372036854775807", true),
            ("attr.big < 1e30", true),
            // strings
            ("tag.region == \"north\"", true),
            ("tag.region != \"south\"", true),
            ("tag.region < \"south\"", true),
            ("tag.region >= \"nort\"", true),
            ("tag.region > \"z\"", false),
            ("tag.region ~ \"n*\"", true),
            ("tag.region ~ \"?orth\"", true),
            ("tag.region ~ \"nor\"", false),
            ("tag.region ~ \"*\"", true),
            ("metric.driver == \"Ann\"", true),
            ("metric.driver == \"ann\"", false),
            // bools: == and != only
            ("metric.door == true", true),
            ("metric.door != false", true),
            ("metric.door > false", false),
            ("metric.door <= true", false),
            ("metric.door ~ \"t*\"", false),
            ("metric.door", true),
            ("reported.door.open", true),
            ("attr.leased", true),
            // type mismatch: false, except != true
            ("tag.region == 1", false),
            ("tag.region != 1", true),
            ("tag.region < 1", false),
            ("metric.fuel == \"0.15\"", false),
            ("metric.fuel != \"0.15\"", true),
            ("metric.fuel ~ \"*\"", false),
            ("metric.fuel == true", false),
            ("metric.fuel != true", true),
            ("metric.driver == true", false),
            ("metric.driver", false),
            ("metric.door == 1", false),
            ("metric.door != 1", true),
            ("tag.region ~ 1", false),
            // tags that are numbers compare as numbers with a number literal
            ("tag.axles == 3", true),
            ("tag.axles == 3.0", true),
            ("tag.axles > 2", true),
            ("tag.axles == \"3\"", true),
            ("tag.axles < \"20\"", false), // as strings, "3" > "20"
            ("tag.axles < 20", true),
            ("tag.weight == 7500", true),
            ("tag.model == 1", false),
            ("tag.model != 1", true),
            ("tag.axles ~ \"3\"", true),
            ("tag.axles == true", false),
            ("tag.axles != true", true),
            // geo: exists only
            ("metric.pos exists", true),
            ("metric.pos == 1", false),
            ("metric.pos == \"52.5\"", false),
            ("metric.pos > 0", false),
            ("metric.pos ~ \"*\"", false),
            ("metric.pos != 1", true),
            ("metric.pos", false),
            // JSON null, arrays, objects: exists only
            ("attr.none exists", true),
            ("attr.none == false", false),
            ("attr.none != false", true),
            ("attr.list exists", true),
            ("attr.list == 1", false),
            ("attr.list != 1", true),
            ("attr.hw exists", true),
            ("attr.hw == \"x\"", false),
            ("attr.hw != \"x\"", true),
            ("attr.hw", false),
            ("attr.hw.vendor ~ \"ac*\"", true),
            // twin
            ("reported.fw == \"1.2.3\" and desired.fw != \"1.2.3\"", true),
            ("desired.door exists", false),
        ];
        for (query, expected) in cases {
            assert_eq!(matches(query), expected, "{query}");
        }
    }

    #[test]
    fn glob_matches_whole_strings() {
        for (text, pattern, expected) in [
            ("", "", true),
            ("", "*", true),
            ("", "?", false),
            ("abc", "abc", true),
            ("abc", "ab", false),
            ("abc", "a*", true),
            ("abc", "*c", true),
            ("abc", "*b", false),
            ("abc", "a?c", true),
            ("abc", "a??c", false),
            ("abc", "*a*b*c*", true),
            ("aaab", "*ab", true),
            ("mississippi", "m*iss*ppi", true),
            ("mississippi", "m*iss*x", false),
            ("a*b", "a*b", true),
            ("ä€", "??", true),
        ] {
            assert_eq!(
                glob_match(text, pattern),
                expected,
                "{text:?} ~ {pattern:?}"
            );
        }
    }

    #[test]
    fn numbers_compare_exactly() {
        let i = |n: i64| Num::Int(n.into());
        let f = Num::Float;
        assert_eq!(compare_num(i(1), f(1.0)), Some(Ordering::Equal));
        assert_eq!(compare_num(i(1), f(1.5)), Some(Ordering::Less));
        assert_eq!(compare_num(i(-1), f(-1.5)), Some(Ordering::Greater));
        assert_eq!(compare_num(f(-0.5), i(0)), Some(Ordering::Less));
        // 2^53 + 1 is not a double; as a double it would equal 2^53
        let big = (1i64 << 53) + 1;
        assert_eq!(
            compare_num(i(big), f(9_007_199_254_740_992.0)),
            Some(Ordering::Greater)
        );
        assert_eq!(
            compare_num(i(i64::MAX), f(9.223_372_036_854_776e18)),
            Some(Ordering::Less)
        );
        assert_eq!(
            compare_num(i(i64::MIN), f(-9.223_372_036_854_776e18)),
            Some(Ordering::Equal)
        );
        assert_eq!(compare_num(i(0), f(1e300)), Some(Ordering::Less));
        assert_eq!(compare_num(i(0), f(-1e300)), Some(Ordering::Greater));
        assert_eq!(compare_num(i(0), f(f64::NAN)), None);
        assert!(Cmp::Ne.holds(None));
        assert!(!Cmp::Eq.holds(None));

        let d = Fixture {
            metrics: [("x".to_owned(), Value::Int(big))].into(),
            ..Fixture::default()
        };
        assert!(q("metric.x == 9007199254740993").matches(&d));
        assert!(!q("metric.x == 9007199254740992").matches(&d));
        assert!(!q("metric.x == 9007199254740992.0").matches(&d));
        assert!(q("metric.x > 9007199254740992.0").matches(&d));
    }

    #[test]
    fn reads_lists_what_a_query_looks_at() {
        assert_eq!(Query::all().reads(), Reads::default());
        assert_eq!(q("id == \"x\" or false").reads(), Reads::default());
        assert_eq!(
            q("online and not (tag.a or group == \"g\")").reads(),
            Reads {
                presence: true,
                tags: true,
                groups: true,
                ..Reads::default()
            }
        );
        assert_eq!(
            q("attr.a exists or metric.m > 1 or reported.r or desired.d").reads(),
            Reads {
                attributes: true,
                metrics: true,
                twin: true,
                ..Reads::default()
            }
        );
        assert!(q("desired.d").reads().twin);
    }

    #[test]
    fn from_str_parses() {
        let query: Query = "online".parse().unwrap();
        assert_eq!(query, q("online"));
        assert!("onlin".parse::<Query>().is_err());
    }

    /// Seed kept from `evaluation_is_consistent`: an `or` operand of `and` needs its own
    /// parentheses when a query is composed from text (`{q1} and {q2}` with q1 = `a or b`).
    #[test]
    fn regression_composed_and_keeps_an_or_operand_grouped() {
        let d = Fixture {
            id: "a".into(),
            groups: ["fleet-a".to_owned()].into(),
            ..Fixture::default()
        };
        let (q1, q2) = (q("not id != \"a\" or false"), q("group != \"fleet-a\""));
        assert!(q1.matches(&d) && !q2.matches(&d));
        let grouped = q(&format!("not (({q1}) and ({q2}))"));
        let de_morgan = q(&format!("not ({q1}) or not ({q2})"));
        assert!(grouped.matches(&d) && de_morgan.matches(&d));
        // without the inner parentheses the text means something else
        assert!(!q(&format!("not ({q1} and {q2})")).matches(&d));
    }

    // --- property tests --------------------------------------------------------------------

    const TAG_KEYS: &[&str] = &["region", "axles", "a.b", "odd key", "q\"x\\"];
    const METRICS: &[&str] = &["fuel", "engine.temp", "door", "driver", "pos"];
    const JSON_PATHS: &[&str] = &["a", "a.b", "n", "s", "x y", "a.b.c"];
    const STRINGS: &[&str] = &["north", "south", "3", "2.5", "", "n*", "?o*", "*", "a\"b"];

    fn any_string() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => prop::sample::select(STRINGS).prop_map(str::to_owned),
            1 => "[a-z\"\\\\ *?.é\n]{0,6}",
        ]
    }

    fn any_literal() -> impl Strategy<Value = Literal> {
        prop_oneof![
            3 => any_string().prop_map(Literal::Str),
            3 => (-2i128..5).prop_map(Literal::Int),
            1 => any::<i64>().prop_map(|i| Literal::Int(i.into())),
            1 => any::<u64>().prop_map(|u| Literal::Int(u.into())),
            2 => prop::sample::select(vec![0.5, 2.5, -1.0, 3.0, 0.15]).prop_map(Literal::Double),
            1 => any::<f64>().prop_filter("finite", |d| d.is_finite()).prop_map(Literal::Double),
            2 => any::<bool>().prop_map(Literal::Bool),
        ]
    }

    fn any_cmp() -> impl Strategy<Value = Cmp> {
        prop::sample::select(vec![
            Cmp::Eq,
            Cmp::Ne,
            Cmp::Lt,
            Cmp::Le,
            Cmp::Gt,
            Cmp::Ge,
            Cmp::Glob,
        ])
    }

    fn any_field() -> impl Strategy<Value = Field> {
        let source = prop::sample::select(vec![
            Source::Tag,
            Source::Attr,
            Source::Metric,
            Source::Reported,
            Source::Desired,
        ]);
        source.prop_flat_map(|source| {
            let names = match source {
                Source::Tag => TAG_KEYS,
                Source::Metric => METRICS,
                Source::Attr | Source::Reported | Source::Desired => JSON_PATHS,
            };
            prop::sample::select(names).prop_map(move |path| Field {
                source,
                path: path.to_owned(),
            })
        })
    }

    fn any_atom() -> impl Strategy<Value = Expr> {
        prop_oneof![
            1 => any::<bool>().prop_map(Expr::Const),
            2 => any::<bool>().prop_map(Expr::Online),
            1 => (any_cmp(), prop::sample::select(vec!["truck-7", "truck-*", "a"]))
                .prop_map(|(op, id)| Expr::Id(op, id.to_owned())),
            1 => (any::<bool>(), prop::sample::select(vec!["fleet-a", "fleet b"]))
                .prop_map(|(member, g)| Expr::Group { member, group: g.to_owned() }),
            1 => any_field().prop_map(|f| Expr::Field(f, Test::Exists)),
            6 => (any_field(), any_cmp(), any_literal())
                .prop_map(|(f, op, lit)| Expr::Field(f, Test::Cmp(op, lit))),
        ]
    }

    fn any_expr() -> impl Strategy<Value = Expr> {
        any_atom().prop_recursive(4, 24, 3, |inner| {
            prop_oneof![
                inner.clone().prop_map(|e| Expr::Not(Box::new(e))),
                prop::collection::vec(inner.clone(), 2..4).prop_map(Expr::And),
                prop::collection::vec(inner, 2..4).prop_map(Expr::Or),
            ]
        })
    }

    fn json_leaf() -> impl Strategy<Value = Json> {
        prop_oneof![
            (-2i64..5).prop_map(Json::from),
            prop::sample::select(vec![0.5, 2.5, 3.0]).prop_map(Json::from),
            prop::sample::select(STRINGS).prop_map(Json::from),
            any::<bool>().prop_map(Json::from),
            Just(Json::Null),
            Just(json!([1, "a"])),
            Just(json!({"c": 1})),
        ]
    }

    fn json_doc() -> impl Strategy<Value = Json> {
        (
            prop::option::of(prop_oneof![
                json_leaf(),
                json_leaf().prop_map(|b| json!({ "b": b }))
            ]),
            prop::collection::btree_map(
                prop::sample::select(vec!["n", "s", "x y"]),
                json_leaf(),
                0..3,
            ),
        )
            .prop_map(|(a, rest)| {
                let mut doc: serde_json::Map<String, Json> =
                    rest.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
                if let Some(a) = a {
                    doc.insert("a".into(), a);
                }
                Json::Object(doc)
            })
    }

    fn metric_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            (-2i64..5).prop_map(Value::Int),
            prop::sample::select(vec![0.5, 2.5, 3.0, 0.15]).prop_map(Value::Double),
            any::<bool>().prop_map(Value::Bool),
            prop::sample::select(STRINGS).prop_map(|s| Value::String(s.to_owned())),
            Just(geo()),
        ]
    }

    fn any_fixture() -> impl Strategy<Value = Fixture> {
        (
            prop::sample::select(vec!["truck-7", "truck-*", "a", "van"]),
            any::<bool>(),
            prop::collection::btree_map(
                prop::sample::select(TAG_KEYS),
                prop::sample::select(STRINGS),
                0..4,
            ),
            json_doc(),
            prop::collection::btree_set(prop::sample::select(vec!["fleet-a", "fleet b"]), 0..3),
            prop::collection::btree_map(prop::sample::select(METRICS), metric_value(), 0..5),
            json_doc(),
            json_doc(),
        )
            .prop_map(
                |(id, online, tags, attributes, groups, metrics, reported, desired)| Fixture {
                    id: id.to_owned(),
                    online,
                    tags: tags
                        .into_iter()
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .collect(),
                    attributes,
                    groups: groups.into_iter().map(str::to_owned).collect(),
                    metrics: metrics
                        .into_iter()
                        .map(|(k, v)| (k.to_owned(), v))
                        .collect(),
                    reported,
                    desired,
                },
            )
    }

    /// Words and symbols of the language, and a few near misses.
    fn token_soup() -> impl Strategy<Value = String> {
        let tokens = vec![
            "online",
            "offline",
            "not",
            "and",
            "or",
            "(",
            ")",
            "true",
            "false",
            "id",
            "group",
            "tag.region",
            "metric.engine.temp",
            "attr.a.b",
            "reported.\"x y\"",
            "desired.",
            "tag",
            "exists",
            "==",
            "!=",
            "<",
            "<=",
            ">",
            ">=",
            "~",
            "=",
            "\"north\"",
            "\"un",
            "\"a\\\"b\"",
            "\"\\x\"",
            "5",
            "-2.5e3",
            "1e999",
            "-",
            "1.",
            "\\",
            "x",
            "é",
            "\n",
        ];
        prop::collection::vec(prop::sample::select(tokens), 0..14).prop_map(|t| t.join(" "))
    }

    fn check_parse_total(source: &str) -> Result<(), TestCaseError> {
        match Query::parse(source) {
            Ok(query) => {
                let canonical = query.to_string();
                prop_assert_eq!(Query::parse(&canonical), Ok(query), "{:?}", canonical);
            }
            Err(e) => {
                prop_assert!(
                    e.position <= source.chars().count(),
                    "{:?}: {:?}",
                    source,
                    e
                );
                prop_assert!(!e.expected.is_empty() && !e.found.is_empty());
            }
        }
        Ok(())
    }

    /// Reference glob: plain recursion, fine for short strings.
    fn glob_reference(text: &[char], pattern: &[char]) -> bool {
        match pattern.split_first() {
            None => text.is_empty(),
            Some(('*', rest)) => (0..=text.len()).any(|skip| glob_reference(&text[skip..], rest)),
            Some((&p, rest)) => text
                .split_first()
                .is_some_and(|(&t, text)| (p == '?' || p == t) && glob_reference(text, rest)),
        }
    }

    proptest! {
        /// `Display` prints a form that parses back to the same query.
        #[test]
        fn display_round_trips(expr in any_expr()) {
            let query = Query { expr };
            let printed = query.to_string();
            prop_assert_eq!(Query::parse(&printed), Ok(query), "{}", printed);
        }

        /// Evaluation is boolean algebra: De Morgan holds, and `or`, `and`, `not` of two parsed
        /// queries agree with the evaluations of each.
        #[test]
        fn evaluation_is_consistent(q1 in any_expr(), q2 in any_expr(), device in any_fixture()) {
            let (q1, q2) = (Query { expr: q1 }, Query { expr: q2 });
            let eval = |source: String| -> Result<bool, TestCaseError> {
                match Query::parse(&source) {
                    Ok(query) => Ok(query.matches(&device)),
                    Err(e) => Err(TestCaseError::fail(format!("{source:?}: {e}"))),
                }
            };
            let (m1, m2) = (q1.matches(&device), q2.matches(&device));
            prop_assert_eq!(
                eval(format!("not (({q1}) and ({q2}))"))?,
                eval(format!("not ({q1}) or not ({q2})"))?
            );
            prop_assert_eq!(
                eval(format!("not ({q1} or {q2})"))?,
                eval(format!("not ({q1}) and not ({q2})"))?
            );
            prop_assert_eq!(eval(format!("{q1} or {q2}"))?, m1 || m2);
            prop_assert_eq!(eval(format!("({q1}) and ({q2})"))?, m1 && m2);
            prop_assert_eq!(eval(format!("not ({q1})"))?, !m1);
            prop_assert_eq!(eval(q1.to_string())?, m1);
        }

        /// A present field is either `== x` or `!= x`, never both; a missing one is neither.
        #[test]
        fn equal_and_not_equal_split_present_fields(
            field in any_field(), literal in any_literal(), device in any_fixture()
        ) {
            let test = |op| Query { expr: Expr::Field(field.clone(), Test::Cmp(op, literal.clone())) };
            let exists = Query { expr: Expr::Field(field.clone(), Test::Exists) }.matches(&device);
            let eq = test(Cmp::Eq).matches(&device);
            let ne = test(Cmp::Ne).matches(&device);
            prop_assert!(!(eq && ne));
            prop_assert_eq!(eq || ne, exists);
            // ordering operators imply existence and agree with each other
            let lt = test(Cmp::Lt).matches(&device);
            let le = test(Cmp::Le).matches(&device);
            let gt = test(Cmp::Gt).matches(&device);
            let ge = test(Cmp::Ge).matches(&device);
            prop_assert!(!(lt || le || gt || ge) || exists);
            prop_assert_eq!(le, lt || (eq && !matches!(literal, Literal::Bool(_))));
            prop_assert_eq!(ge, gt || (eq && !matches!(literal, Literal::Bool(_))));
            prop_assert!(!(lt && gt));
        }

        /// Parsing any text returns a query or an error inside the text; never a panic.
        #[test]
        fn parse_is_total(source in any::<String>()) {
            check_parse_total(&source)?;
        }

        /// The same for sequences of the language's own tokens, which get much further.
        #[test]
        fn parse_is_total_on_token_soup(source in token_soup()) {
            check_parse_total(&source)?;
        }

        /// The glob matcher agrees with the plain recursive definition.
        #[test]
        fn glob_matches_the_reference(text in "[ab?*]{0,8}", pattern in "[ab?*]{0,6}") {
            let (t, p): (Vec<char>, Vec<char>) = (text.chars().collect(), pattern.chars().collect());
            prop_assert_eq!(glob_match(&text, &pattern), glob_reference(&t, &p));
        }
    }
}
