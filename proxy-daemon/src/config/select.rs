//! Item selection as RouterOS writes it: `[find]`, `[find name=value ...]`,
//! `[find where EXPR]` wherever an item number is taken, and `print where
//! EXPR`. Sans-io: an [`Expr`] is parsed from text and tested against an
//! item through a function that gives a property's printed value(s).
//!
//! `EXPR` is comparisons `NAME OP VALUE` (`=`, `!=`, `<`, `>`, `<=`, `>=`,
//! and `~`, a regular expression searched in the printed value), flags
//! (`disabled`, `!disabled`), `not`/`!`, `and`/`&&` (also by juxtaposition),
//! `or`/`||` and parentheses. `<`/`>` compare numbers where both sides are
//! numbers (a port range by its first port), text otherwise. A property
//! that is not set prints as the empty value. Errors carry the column.

use std::cmp::Ordering;
use std::fmt;

/// A parsed selection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expr {
    node: Node,
    /// The text it was parsed from, for messages.
    text: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Node {
    All,
    Cmp {
        prop: String,
        op: Op,
        value: String,
    },
    /// `~`, its expression compiled once.
    Match {
        prop: String,
        re: Pattern,
    },
    /// `in`, its prefix parsed once.
    In {
        prop: String,
        net: ipnet::IpNet,
    },
    Flag(String),
    Not(Box<Node>),
    And(Vec<Node>),
    Or(Vec<Node>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Lt,
    Gt,
    Le,
    Ge,
}

/// A compiled regular expression; equal to another written the same way.
#[derive(Clone, Debug)]
struct Pattern(regex_lite::Regex);

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

impl Eq for Pattern {}

/// A selection that does not parse: what and where (1-based column).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SelectError {
    pub column: usize,
    pub message: String,
    pub text: String,
}

impl fmt::Display for SelectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at column {} of `{}`", self.message, self.column, self.text)
    }
}

impl Expr {
    /// Every item (`[find]`).
    pub fn all() -> Self {
        Expr { node: Node::All, text: String::new() }
    }

    /// Parses `EXPR` (what follows `where`, or the inside of `[find ...]`
    /// after `find` and an optional `where`); `props` are the names it may use.
    pub fn parse(text: &str, props: &[&str]) -> Result<Self, SelectError> {
        let mut p = Parser { chars: text.chars().collect(), pos: 0, text, props };
        p.skip_ws();
        if p.at_end() {
            return Ok(Expr::all());
        }
        let node = p.or()?;
        p.skip_ws();
        if !p.at_end() {
            return Err(p.error("unexpected text (a `)` without `(`?)"));
        }
        Ok(Expr { node, text: text.to_owned() })
    }

    /// Whether the item whose properties `values` gives is selected.
    /// `values(name)` lists the printed forms of the property (one usually;
    /// an address with a port also matches without it); empty when not set.
    pub fn matches(&self, values: &dyn Fn(&str) -> Vec<String>) -> bool {
        eval(&self.node, values)
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn eval(node: &Node, values: &dyn Fn(&str) -> Vec<String>) -> bool {
    match node {
        Node::All => true,
        Node::Not(n) => !eval(n, values),
        Node::And(ns) => ns.iter().all(|n| eval(n, values)),
        Node::Or(ns) => ns.iter().any(|n| eval(n, values)),
        Node::Flag(prop) => values(prop).iter().any(|v| v == "yes" || v == "true"),
        // An unset property prints as the empty value.
        Node::Match { prop, re } => printed(values, prop).iter().any(|g| re.0.is_match(g)),
        Node::In { prop, net } => {
            printed(values, prop).iter().filter_map(|g| prefix(g)).any(|inner| net.contains(&inner))
        }
        Node::Cmp { prop, op, value } => {
            let got = printed(values, prop);
            match op {
                Op::Ne => !got.iter().any(|g| g == value),
                Op::Eq => got.iter().any(|g| g == value),
                // An unset property has no order: `<` and `>` never select it.
                _ => got.iter().filter(|g| !g.is_empty()).any(|g| {
                    let ord = compare(g, value);
                    match op {
                        Op::Lt => ord == Ordering::Less,
                        Op::Gt => ord == Ordering::Greater,
                        Op::Le => ord != Ordering::Greater,
                        _ => ord != Ordering::Less,
                    }
                }),
            }
        }
    }
}

/// A property's printed values; one empty value when it is not set.
fn printed(values: &dyn Fn(&str) -> Vec<String>, prop: &str) -> Vec<String> {
    let mut got = values(prop);
    if got.is_empty() {
        got.push(String::new());
    }
    got
}

/// An address or prefix as `in` sees it (a bare address is its own /32 or /128).
fn prefix(text: &str) -> Option<ipnet::IpNet> {
    text.parse().ok().or_else(|| text.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from))
}

/// Numbers (a range `N-M` by `N`) compare as numbers, the rest as text.
fn compare(item: &str, value: &str) -> Ordering {
    let num = |s: &str| s.split('-').next().and_then(|n| n.parse::<u64>().ok());
    match (num(item), value.parse::<u64>().ok()) {
        (Some(a), Some(b)) if !item.is_empty() => a.cmp(&b),
        _ => item.cmp(value),
    }
}

struct Parser<'a> {
    chars: Vec<char>,
    pos: usize,
    text: &'a str,
    props: &'a [&'a str],
}

impl Parser<'_> {
    fn error(&self, message: &str) -> SelectError {
        SelectError { column: self.pos + 1, message: message.into(), text: self.text.into() }
    }

    fn at_end(&self) -> bool {
        self.pos >= self.chars.len()
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
    }

    /// Consumes `word` when it stands here as a whole word (or symbol).
    fn keyword(&mut self, word: &str) -> bool {
        let w: Vec<char> = word.chars().collect();
        let end = self.pos + w.len();
        if self.chars.get(self.pos..end) != Some(&w[..]) {
            return false;
        }
        let alpha = w[0].is_alphabetic();
        if alpha && self.chars.get(end).is_some_and(|c| is_name_char(*c)) {
            return false;
        }
        self.pos = end;
        true
    }

    fn or(&mut self) -> Result<Node, SelectError> {
        let mut terms = vec![self.and()?];
        loop {
            self.skip_ws();
            if self.keyword("or") || self.keyword("||") {
                terms.push(self.and()?);
            } else {
                break;
            }
        }
        Ok(if terms.len() == 1 { terms.pop().unwrap() } else { Node::Or(terms) })
    }

    fn and(&mut self) -> Result<Node, SelectError> {
        let mut terms = vec![self.unary()?];
        loop {
            self.skip_ws();
            if self.at_end() || self.peek() == Some(')') {
                break;
            }
            let save = self.pos;
            if self.keyword("or") || self.keyword("||") {
                self.pos = save;
                break;
            }
            // `and` is optional: `a=1 b=2` means both.
            let _ = self.keyword("and") || self.keyword("&&");
            terms.push(self.unary()?);
        }
        Ok(if terms.len() == 1 { terms.pop().unwrap() } else { Node::And(terms) })
    }

    fn unary(&mut self) -> Result<Node, SelectError> {
        self.skip_ws();
        if self.at_end() {
            return Err(self.error("a condition is missing"));
        }
        if self.keyword("not") || self.keyword("!") {
            return Ok(Node::Not(Box::new(self.unary()?)));
        }
        if self.peek() == Some('(') {
            self.pos += 1;
            let inner = self.or()?;
            self.skip_ws();
            if self.peek() != Some(')') {
                return Err(self.error("`)` expected"));
            }
            self.pos += 1;
            return Ok(inner);
        }
        self.comparison()
    }

    fn comparison(&mut self) -> Result<Node, SelectError> {
        let start = self.pos;
        while self.peek().is_some_and(is_name_char) {
            self.pos += 1;
        }
        if self.pos == start {
            return Err(self.error("a property name is expected"));
        }
        let name: String = self.chars[start..self.pos].iter().collect();
        if !self.props.contains(&name.as_str()) {
            self.pos = start;
            return Err(self.error(&format!("unknown property `{name}` (allowed: {})", self.props.join(", "))));
        }
        self.skip_ws();
        // The operator; `~` and `in` have values of their own kind.
        enum Operator {
            Cmp(Op),
            Match,
            In,
        }
        let operator = if self.keyword("!=") {
            Operator::Cmp(Op::Ne)
        } else if self.keyword("<=") {
            Operator::Cmp(Op::Le)
        } else if self.keyword(">=") {
            Operator::Cmp(Op::Ge)
        } else if self.keyword("=") {
            Operator::Cmp(Op::Eq)
        } else if self.keyword("<") {
            Operator::Cmp(Op::Lt)
        } else if self.keyword(">") {
            Operator::Cmp(Op::Gt)
        } else if self.keyword("~") {
            Operator::Match
        } else if self.keyword("in") {
            Operator::In
        } else {
            return Ok(Node::Flag(name));
        };
        self.skip_ws();
        let value = self.value()?;
        match operator {
            Operator::Cmp(op) => Ok(Node::Cmp { prop: name, op, value }),
            Operator::Match => match regex_lite::Regex::new(&value) {
                Ok(re) => Ok(Node::Match { prop: name, re: Pattern(re) }),
                Err(e) => Err(self.error(&format!("invalid regular expression: {e}"))),
            },
            Operator::In => match prefix(&value) {
                Some(net) => Ok(Node::In { prop: name, net }),
                None => {
                    Err(self.error(&format!("`in` takes an address or prefix (a.b.c.d/len, x::y/len), not `{value}`")))
                }
            },
        }
    }

    fn value(&mut self) -> Result<String, SelectError> {
        let mut out = String::new();
        if self.peek() == Some('"') {
            self.pos += 1;
            loop {
                match self.peek() {
                    None => return Err(self.error("unterminated quote")),
                    Some('"') => {
                        self.pos += 1;
                        return Ok(out);
                    }
                    Some('\\') => {
                        self.pos += 1;
                        match self.peek() {
                            Some('n') => out.push('\n'),
                            Some('t') => out.push('\t'),
                            Some(c) => out.push(c),
                            None => return Err(self.error("unterminated quote")),
                        }
                        self.pos += 1;
                    }
                    Some(c) => {
                        out.push(c);
                        self.pos += 1;
                    }
                }
            }
        }
        while let Some(c) = self.peek().filter(|c| !c.is_whitespace() && *c != ')') {
            out.push(c);
            self.pos += 1;
        }
        Ok(out)
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

/// Joins command words back into expression text, quoting a word's value
/// again when the shell or the script splitter took its quotes off
/// (`comment=ftp client` becomes `comment="ftp client"`).
pub fn join_words(words: &[&str]) -> String {
    words
        .iter()
        .map(|w| {
            if !w.chars().any(|c| c.is_whitespace() || c == '"') {
                return w.to_string();
            }
            let split = w.find(['=', '~', '<', '>']).map(|i| {
                let mut j = i + 1;
                while w[j..].starts_with(['=', '~']) {
                    j += 1;
                }
                j
            });
            match split {
                // A value with spaces (`comment=ftp client`), unless the word
                // is a whole expression quoted for the shell (`a=1 and b=2`).
                Some(j) if !is_expression(&w[j..]) => format!("{}{}", &w[..j], quoted(&w[j..])),
                _ => w.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether text after an operator reads as more expression rather than one value.
fn is_expression(rest: &str) -> bool {
    rest.contains(['=', '<', '>', '~', '(', ')', '"'])
        || rest.split_whitespace().any(|w| matches!(w, "and" | "or" | "not" | "&&" | "||"))
}

fn quoted(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROPS: &[&str] = &["action", "dst-port", "comment", "disabled", "src-address"];

    fn item<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Vec<String> + 'a {
        move |name: &str| pairs.iter().filter(|(k, _)| *k == name).map(|(_, v)| v.to_string()).collect()
    }

    fn sel(expr: &str, pairs: &[(&str, &str)]) -> bool {
        Expr::parse(expr, PROPS).unwrap_or_else(|e| panic!("{e}")).matches(&item(pairs))
    }

    #[test]
    fn operators_and_logic() {
        let rule = [("action", "deny"), ("dst-port", "1024-65535"), ("comment", "ftp client"), ("disabled", "no")];
        assert!(sel("", &rule));
        assert!(sel("action=deny", &rule));
        assert!(!sel("action!=deny", &rule));
        assert!(sel("dst-port>1000 dst-port<2000", &rule));
        assert!(sel("dst-port>=1024 and dst-port<=1024", &rule));
        assert!(sel("comment=\"ftp client\"", &rule));
        assert!(sel("comment~\"^ftp\"", &rule));
        assert!(!sel("comment~\"^client\"", &rule));
        assert!(sel("!disabled", &rule));
        assert!(!sel("disabled", &rule));
        assert!(sel("not (action=allow or disabled)", &rule));
        assert!(sel("action=allow || dst-port>1023 && !disabled", &rule));
        // Unset properties print as the empty value.
        assert!(sel("src-address=\"\"", &rule));
        assert!(sel("src-address!=10.0.0.0/8", &rule));
        // ... but have no order: neither below nor above a number or a text.
        let any_port = [("action", "allow")];
        for expr in ["dst-port<22", "dst-port<=22", "dst-port>22", "dst-port>=0", "comment<\"m\""] {
            assert!(!sel(expr, &any_port), "{expr} selected an unset property");
        }
        assert!(sel("!(dst-port<22)", &any_port));
        // `in`: an address or prefix inside a prefix; a name or an unset value never.
        let rule = [("src-address", "10.1.0.0/16"), ("dst-port", "22")];
        assert!(sel("src-address in 10.0.0.0/8", &rule));
        assert!(sel("src-address in 10.1.0.0/16", &rule));
        assert!(!sel("src-address in 10.1.2.0/24", &rule), "a wider prefix is not inside a narrower one");
        assert!(!sel("src-address in 192.168.0.0/16", &rule));
        assert!(sel("src-address in 10.1.0.0", &[("src-address", "10.1.0.0")]));
        assert!(!sel("src-address in ::/0", &rule));
        assert!(!sel("src-address in 0.0.0.0/0", &[("action", "allow")]));
    }

    #[test]
    fn errors_name_the_column() {
        let e = Expr::parse("action=deny (dst-port=21", PROPS).unwrap_err();
        assert_eq!(e.column, 25, "{e}");
        let e = Expr::parse("action=deny colour=red", PROPS).unwrap_err();
        assert_eq!(e.column, 13, "{e}");
        assert!(e.to_string().contains("unknown property `colour`"), "{e}");
        let e = Expr::parse("comment~\"(\"", PROPS).unwrap_err();
        assert!(e.message.contains("regular expression"), "{e}");
        assert!(Expr::parse("action=deny)", PROPS).is_err());
        assert!(Expr::parse("and", PROPS).is_err());
        let e = Expr::parse("src-address in lan", PROPS).unwrap_err();
        assert!(e.message.contains("`in` takes an address or prefix"), "{e}");
    }

    #[test]
    fn words_are_requoted() {
        assert_eq!(join_words(&["comment=ftp client", "action=deny"]), "comment=\"ftp client\" action=deny");
        assert_eq!(join_words(&["comment~a b"]), "comment~\"a b\"");
        // A whole expression quoted for the shell stays as it is.
        assert_eq!(join_words(&["action=deny and dst-port>10"]), "action=deny and dst-port>10");
        assert_eq!(join_words(&["action=deny (x"]), "action=deny (x");
    }
}
