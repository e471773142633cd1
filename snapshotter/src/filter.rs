//! containerd's filter expression language (`github.com/containerd/containerd/filters`,
//! as of containerd 1.6): parsing the `filters` strings of requests such as
//! `Snapshots.List` and matching them against an object's fields.
//!
//! Grammar (one string):
//!
//! ```text
//! selectors := selector ("," selector)*
//! selector  := fieldpath (operator value)?
//! fieldpath := field ("." field)*
//! field     := quoted | [A-Za-z0-9_]+
//! operator  := "==" | "!=" | "~="
//! value     := quoted | any non-space, non-comma graphic runes
//! quoted    := "..." with Go escapes; `~=` values may also use /.../ or |...|
//! ```
//!
//! Selectors within a string are AND'ed, the strings of a list are OR'ed, and
//! an empty list or an empty string matches everything. A bare fieldpath tests
//! presence. As in containerd, `!=` and `~=` compare an absent field as `""`,
//! while `==` never matches an absent field.

use std::fmt;
use std::sync::LazyLock;

use regex::Regex;

/// A parsed list of filter expressions (OR of ANDs).
#[derive(Debug, Clone)]
pub struct Filter {
    /// Matches if any conjunction matches; an empty conjunction matches all.
    any_of: Vec<Vec<Selector>>,
}

/// Why a filter failed to parse. containerd reports all of these to clients as
/// `InvalidArgument`.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// The input is not in the filter grammar. `position` is a byte offset.
    #[error("filters: parse error: {}: {message}", Located(input, *position))]
    Syntax {
        input: String,
        position: usize,
        message: String,
    },
    /// The value of a `~=` selector is not a valid regular expression.
    #[error("filters: invalid regular expression {pattern:?} at {}: {source}", Located(input, *position))]
    Regex {
        input: String,
        position: usize,
        pattern: String,
        source: regex::Error,
    },
}

/// Renders `input` with the rune at `position` marked, like containerd does.
struct Located<'a>(&'a str, usize);

impl fmt::Display for Located<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Located(input, pos) = *self;
        match input.get(pos..).and_then(|rest| rest.chars().next()) {
            Some(c) => {
                let (before, after) = (&input[..pos], &input[pos + c.len_utf8()..]);
                write!(f, "[{before} >|{c}|< {after}]")
            }
            None => write!(f, "[{input}]"),
        }
    }
}

impl Filter {
    /// Parses each string; the result matches if any of them matches. Empty list → matches all.
    pub fn parse_all<S: AsRef<str>>(exprs: &[S]) -> Result<Filter, FilterError> {
        if exprs.is_empty() {
            return Ok(Filter {
                any_of: vec![Vec::new()],
            });
        }
        let any_of = exprs
            .iter()
            .map(|expr| Parser::new(expr.as_ref()).parse())
            .collect::<Result<_, _>>()?;
        Ok(Filter { any_of })
    }

    /// `field(path)` returns the field's value if present, e.g. for `["labels", "l"]` the label's value.
    pub fn matches(&self, field: impl Fn(&[String]) -> Option<String>) -> bool {
        self.any_of
            .iter()
            .any(|all| all.iter().all(|selector| selector.matches(&field)))
    }
}

#[derive(Debug, Clone)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

#[derive(Debug, Clone)]
enum Op {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(Regex),
}

impl Selector {
    fn matches(&self, field: &dyn Fn(&[String]) -> Option<String>) -> bool {
        let value = field(&self.path);
        match &self.op {
            Op::Present => value.is_some(),
            Op::Equal(want) => value.as_deref() == Some(want.as_str()),
            Op::NotEqual(want) => value.as_deref().unwrap_or("") != want,
            Op::Matches(re) => re.is_match(value.as_deref().unwrap_or("")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Token<'a> {
    Eof,
    /// A quoted literal, delimiters included.
    Quoted(&'a str),
    Value(&'a str),
    Field(&'a str),
    /// `,` or `.`.
    Separator,
    /// A run of `=`, `!` and `~`, not necessarily a valid operator.
    Operator(&'a str),
    Illegal(&'static str),
    /// Any other rune.
    Unexpected,
}

/// Tokenizer. After an operator it is in value mode, where a bare token runs
/// to the next comma or whitespace instead of stopping at non-field runes.
struct Scanner<'a> {
    input: &'a str,
    /// Start of the rune last returned by `next`.
    pos: usize,
    /// End of that rune.
    ppos: usize,
    value: bool,
    /// First error seen; sticky, as in containerd.
    err: Option<&'static str>,
}

/// Value runes: Go's `unicode.IsGraphic` minus whitespace and `,`.
static VALUE_RUN: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\A[[\p{L}\p{M}\p{N}\p{P}\p{S}]&&[^,]]*").expect("valid value-rune regex")
});

fn is_field_char(c: char) -> bool {
    c == '_' || c.is_ascii_alphanumeric()
}

impl<'a> Scanner<'a> {
    fn new(input: &'a str) -> Self {
        Scanner {
            input,
            pos: 0,
            ppos: 0,
            value: false,
            err: None,
        }
    }

    fn error(&mut self, msg: &'static str) {
        self.err.get_or_insert(msg);
    }

    fn next(&mut self) -> Option<char> {
        self.pos = self.ppos;
        let c = self.input[self.ppos..].chars().next()?;
        self.ppos += c.len_utf8();
        if c == '\0' {
            self.error("unexpected null");
        }
        Some(c)
    }

    fn peek(&self) -> Option<char> {
        self.input[self.ppos..].chars().next()
    }

    fn eat_while(&mut self, pred: impl Fn(char) -> bool) {
        let rest = &self.input[self.ppos..];
        self.ppos += rest.find(|c| !pred(c)).unwrap_or(rest.len());
    }

    /// Returns the start of the token and the token.
    fn scan(&mut self) -> (usize, Token<'a>) {
        loop {
            let ch = self.next();
            let start = self.pos;
            let token = match ch {
                None => Token::Eof,
                Some('\0') => Token::Illegal(self.err.unwrap_or("unexpected null")),
                Some(quote @ ('/' | '|' | '"')) => match self.scan_quoted(quote) {
                    Ok(()) => Token::Quoted(&self.input[start..self.ppos]),
                    Err(msg) => Token::Illegal(msg),
                },
                Some(',' | '.') => {
                    self.value = false;
                    Token::Separator
                }
                Some('=' | '!' | '~') => {
                    self.eat_while(|c| matches!(c, '=' | '!' | '~'));
                    self.value = true;
                    Token::Operator(&self.input[start..self.ppos])
                }
                Some(c) if c.is_whitespace() => continue,
                Some(_) if self.value => {
                    // The first rune is taken as is; the rest must be value runes.
                    self.ppos += VALUE_RUN
                        .find(&self.input[self.ppos..])
                        .map_or(0, |m| m.end());
                    self.value = false;
                    Token::Value(&self.input[start..self.ppos])
                }
                Some(c) if is_field_char(c) => {
                    self.eat_while(is_field_char);
                    Token::Field(&self.input[start..self.ppos])
                }
                Some(_) => Token::Unexpected,
            };
            return (start, token);
        }
    }

    /// Checks the syntax of a quoted literal; decoding is left to [`unquote`].
    fn scan_quoted(&mut self, quote: char) -> Result<(), &'static str> {
        let mut legal = true;
        let mut ch = self.next();
        while ch != Some(quote) {
            match ch {
                None | Some('\n' | '\0') => {
                    self.error("quoted literal not terminated");
                    legal = false;
                    break;
                }
                Some('\\') => {
                    let (after, ok) = self.scan_escape(quote);
                    legal &= ok;
                    ch = after;
                }
                Some(_) => ch = self.next(),
            }
        }
        match (legal, self.err) {
            (true, _) => Ok(()),
            (false, err) => Err(err.unwrap_or("illegal quoted literal")),
        }
    }

    /// Consumes an escape after `\`; returns the rune following it and validity.
    fn scan_escape(&mut self, quote: char) -> (Option<char>, bool) {
        match self.next() {
            Some(c) if c == quote || "abfnrtv\\".contains(c) => (self.next(), true),
            Some(c @ '0'..='7') => self.scan_digits(Some(c), 8, 3),
            Some('x') => self.scan_digits_after(16, 2),
            Some('u') => self.scan_digits_after(16, 4),
            Some('U') => self.scan_digits_after(16, 8),
            other => {
                self.error("illegal escape sequence");
                (other, false)
            }
        }
    }

    fn scan_digits_after(&mut self, radix: u32, n: usize) -> (Option<char>, bool) {
        let first = self.next();
        self.scan_digits(first, radix, n)
    }

    fn scan_digits(
        &mut self,
        mut ch: Option<char>,
        radix: u32,
        mut n: usize,
    ) -> (Option<char>, bool) {
        while n > 0 && ch.is_some_and(|c| c.is_digit(radix)) {
            ch = self.next();
            n -= 1;
        }
        if n > 0 {
            self.error("illegal numeric escape sequence");
        }
        (ch, n == 0)
    }
}

/// Decodes a quoted literal (delimiters included) the way containerd's
/// `unquote` does: Go string escapes, where `\<quote>` is the only quote escape.
fn unquote(literal: &str) -> Result<String, &'static str> {
    const SYNTAX: &str = "quote syntax error";
    let quote = literal.chars().next().ok_or(SYNTAX)?;
    let mut rest = literal[quote.len_utf8()..]
        .strip_suffix(quote)
        .ok_or(SYNTAX)?;
    let mut out = Vec::with_capacity(rest.len());
    let mut push =
        |out: &mut Vec<u8>, c: char| out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
    while let Some(c) = rest.chars().next() {
        rest = &rest[c.len_utf8()..];
        match c {
            '\n' => return Err(SYNTAX),
            c if c == quote => return Err(SYNTAX),
            '\\' => {}
            c => {
                push(&mut out, c);
                continue;
            }
        }
        let esc = rest.chars().next().ok_or(SYNTAX)?;
        rest = &rest[esc.len_utf8()..];
        match esc {
            'a' => out.push(0x07),
            'b' => out.push(0x08),
            'f' => out.push(0x0c),
            'n' => out.push(b'\n'),
            'r' => out.push(b'\r'),
            't' => out.push(b'\t'),
            'v' => out.push(0x0b),
            '\\' => out.push(b'\\'),
            c if c == quote => push(&mut out, c),
            // A single byte, which may leave the result invalid UTF-8.
            'x' => out.push(take_digits(&mut rest, 2, 16)? as u8),
            'u' | 'U' => {
                let v = take_digits(&mut rest, if esc == 'u' { 4 } else { 8 }, 16)?;
                if v > char::MAX as u32 {
                    return Err(SYNTAX);
                }
                // Go encodes surrogate halves as U+FFFD.
                push(
                    &mut out,
                    char::from_u32(v).unwrap_or(char::REPLACEMENT_CHARACTER),
                );
            }
            '0'..='7' => {
                let v = (esc as u32 - '0' as u32) << 6 | take_digits(&mut rest, 2, 8)?;
                out.push(u8::try_from(v).map_err(|_| SYNTAX)?);
            }
            _ => return Err(SYNTAX),
        }
    }
    String::from_utf8(out).map_err(|_| "escapes do not form valid UTF-8")
}

/// Takes exactly `n` digits of `radix` off the front of `rest`.
fn take_digits(rest: &mut &str, n: usize, radix: u32) -> Result<u32, &'static str> {
    let digits = rest
        .get(..n)
        .filter(|d| d.chars().all(|c| c.is_digit(radix)));
    let digits = digits.ok_or("quote syntax error")?;
    *rest = &rest[n..];
    u32::from_str_radix(digits, radix).map_err(|_| "quote syntax error")
}

#[derive(Clone, Copy, PartialEq)]
enum Operator {
    Equal,
    NotEqual,
    Matches,
}

/// Recursive-descent parser over one filter string.
struct Parser<'a> {
    input: &'a str,
    scanner: Scanner<'a>,
}

impl<'a> Parser<'a> {
    fn new(input: &'a str) -> Self {
        Parser {
            input,
            scanner: Scanner::new(input),
        }
    }

    fn error(&self, position: usize, message: impl Into<String>) -> FilterError {
        FilterError::Syntax {
            input: self.input.to_owned(),
            position,
            message: message.into(),
        }
    }

    /// The AND'ed selectors of one string; the empty string has none.
    fn parse(mut self) -> Result<Vec<Selector>, FilterError> {
        if self.input.is_empty() {
            return Ok(Vec::new());
        }
        let mut selectors = vec![self.selector()?];
        loop {
            match self.scanner.peek() {
                None => return Ok(selectors),
                Some(',') => {
                    self.scanner.scan();
                    selectors.push(self.selector()?);
                }
                Some(c) => {
                    let msg = format!("unexpected input: {}", c.escape_debug());
                    return Err(self.error(self.scanner.ppos, msg));
                }
            }
        }
    }

    fn selector(&mut self) -> Result<Selector, FilterError> {
        let path = self.fieldpath()?;
        if matches!(self.scanner.peek(), None | Some(',')) {
            return Ok(Selector {
                path,
                op: Op::Present,
            });
        }
        let operator = self.operator()?;
        let (position, value) = self.value(operator == Operator::Matches)?;
        let op = match operator {
            Operator::Equal => Op::Equal(value),
            Operator::NotEqual => Op::NotEqual(value),
            Operator::Matches => match Regex::new(&value) {
                Ok(re) => Op::Matches(re),
                Err(source) => {
                    let input = self.input.to_owned();
                    return Err(FilterError::Regex {
                        input,
                        position,
                        pattern: value,
                        source,
                    });
                }
            },
        };
        Ok(Selector { path, op })
    }

    fn fieldpath(&mut self) -> Result<Vec<String>, FilterError> {
        let mut path = vec![self.field()?];
        while self.scanner.peek() == Some('.') {
            self.scanner.scan();
            path.push(self.field()?);
        }
        Ok(path)
    }

    fn field(&mut self) -> Result<String, FilterError> {
        match self.scanner.scan() {
            (_, Token::Field(s)) => Ok(s.to_owned()),
            (pos, Token::Quoted(s)) => self.unquote(pos, s, false),
            (pos, Token::Illegal(msg)) => Err(self.error(pos, msg)),
            (pos, _) => Err(self.error(pos, "expected field or quoted")),
        }
    }

    fn operator(&mut self) -> Result<Operator, FilterError> {
        match self.scanner.scan() {
            (_, Token::Operator("==")) => Ok(Operator::Equal),
            (_, Token::Operator("!=")) => Ok(Operator::NotEqual),
            (_, Token::Operator("~=")) => Ok(Operator::Matches),
            (pos, Token::Operator(s)) => {
                Err(self.error(pos, format!("unsupported operator {s:?}")))
            }
            (pos, Token::Illegal(msg)) => Err(self.error(pos, msg)),
            (pos, _) => Err(self.error(pos, r#"expected an operator ("=="|"!="|"~=")"#)),
        }
    }

    /// Returns the value and where it starts; `/.../` and `|...|` only if `alt_quotes`.
    fn value(&mut self, alt_quotes: bool) -> Result<(usize, String), FilterError> {
        match self.scanner.scan() {
            (pos, Token::Value(s) | Token::Field(s)) => Ok((pos, s.to_owned())),
            (pos, Token::Quoted(s)) => Ok((pos, self.unquote(pos, s, alt_quotes)?)),
            (pos, Token::Illegal(msg)) => Err(self.error(pos, msg)),
            (pos, _) => Err(self.error(pos, "expected value or quoted")),
        }
    }

    fn unquote(&self, pos: usize, literal: &str, alt_quotes: bool) -> Result<String, FilterError> {
        if !alt_quotes && !literal.starts_with('"') {
            return Err(self.error(pos, "invalid quote encountered"));
        }
        unquote(literal).map_err(|e| self.error(pos, format!("unquoting failed: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn select<'a, T>(
        filters: &[&str],
        items: &'a [T],
        field: impl Fn(&T, &[String]) -> Option<String>,
    ) -> Vec<&'a T> {
        let filter = Filter::parse_all(filters).unwrap_or_else(|e| panic!("{filters:?}: {e}"));
        items
            .iter()
            .filter(|item| filter.matches(|path| field(item, path)))
            .collect()
    }

    fn syntax_error(input: &str) -> String {
        let err = Filter::parse_all(&[input]).expect_err(input);
        assert!(
            matches!(err, FilterError::Syntax { .. }),
            "{input}: {err:?}"
        );
        err.to_string()
    }

    type Snapshot = (
        &'static str,
        &'static str,
        &'static str,
        Option<&'static str>,
    );

    /// The snapshots checkWalk creates: name, kind, parent, label `l`; all have
    /// `containerd.io/gc.root=check-walk`.
    const SNAPSHOTS: &[Snapshot] = &[
        ("a-np", "active", "", None),
        ("p", "committed", "", None),
        ("a", "active", "p", None),
        ("v", "view", "p", None),
        ("p-wl", "committed", "", Some("1")),
        ("a-wl", "active", "p-wl", Some("2")),
        ("v-wl", "view", "p-wl", Some("3")),
        ("a-np-wl", "active", "", Some("2")),
    ];

    /// Mirrors containerd's metadata `adaptSnapshot`.
    fn snapshot_field(&(name, kind, parent, l): &Snapshot, path: &[String]) -> Option<String> {
        let path: Vec<&str> = path.iter().map(String::as_str).collect();
        match path.as_slice() {
            ["kind"] => Some(kind.into()),
            ["name"] => Some(name.into()),
            ["parent"] => Some(parent.into()),
            ["labels", key @ ..] => match key.join(".").as_str() {
                "containerd.io/gc.root" => Some("check-walk".into()),
                "l" => l.map(Into::into),
                _ => None,
            },
            _ => None,
        }
    }

    fn walk(filters: &[&str]) -> Vec<&'static str> {
        select(filters, SNAPSHOTS, snapshot_field)
            .into_iter()
            .map(|s| s.0)
            .collect()
    }

    #[test]
    fn check_walk_filters() {
        let root = r#"labels."containerd.io/gc.root"==check-walk"#;
        let cases: &[(&[&str], &[&str])] = &[
            (
                &[root],
                &["a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl"],
            ),
            (
                &[&format!("kind==active,{root}")],
                &["a-np", "a", "a-wl", "a-np-wl"],
            ),
            (&[&format!("kind==view,{root}")], &["v", "v-wl"]),
            (&[&format!("kind==committed,{root}")], &["p", "p-wl"]),
            (&["name==p", "name==a-np-wl"], &["p", "a-np-wl"]),
            (&["name==a-wl,labels.l"], &["a-wl"]),
            (&["parent==p"], &["a", "v"]),
            (
                &[&format!(r#"parent!="",{root}"#)],
                &["a", "v", "a-wl", "v-wl"],
            ),
            (&["labels.l"], &["p-wl", "a-wl", "v-wl", "a-np-wl"]),
            (&["labels.l==2"], &["a-wl", "a-np-wl"]),
        ];
        for (filters, want) in cases {
            assert_eq!(walk(filters), *want, "{filters:?}");
        }
    }

    #[test]
    fn empty_list_and_empty_string_match_all() {
        let all: Vec<_> = SNAPSHOTS.iter().map(|s| s.0).collect();
        assert_eq!(walk(&[]), all);
        assert_eq!(walk(&[""]), all);
        assert_eq!(walk(&["name==nope", ""]), all);
    }

    /// `(name, other, labels)`, the corpus of containerd's filter_test.go.
    type Entry = (
        &'static str,
        &'static str,
        &'static [(&'static str, &'static str)],
    );
    static CORPUS: &[Entry] = &[
        ("foo", "", &[("foo", "true")]),
        ("bar", "", &[]),
        (
            "foo",
            "",
            &[("foo", "present"), ("more complex label", "present")],
        ),
        ("bar", "", &[("bar", "true")]),
        (
            "fooer",
            "",
            &[("more complex label with \\ and \"", "present")],
        ),
        (
            "fooer",
            "",
            &[("more complex label with \\ and \".post", "present")],
        ),
        ("baz", "too complex, yo", &[]),
        ("bazo", "abc", &[]),
        ("compound", "", &[("foo", "omg_asdf.asdf-qwer")]),
    ];

    fn entry_field(&(name, other, labels): &Entry, path: &[String]) -> Option<String> {
        match path[0].as_str() {
            "name" => Some(name).filter(|s| !s.is_empty()).map(Into::into),
            "other" => Some(other).filter(|s| !s.is_empty()).map(Into::into),
            "labels" => {
                let key = path[1..].join(".");
                labels
                    .iter()
                    .find(|(k, _)| *k == key)
                    .map(|(_, v)| (*v).into())
            }
            _ => None,
        }
    }

    fn corpus(filter: &str) -> Vec<usize> {
        let matched = select(&[filter], CORPUS, entry_field);
        matched
            .iter()
            .map(|m| CORPUS.iter().position(|e| std::ptr::eq(e, *m)).unwrap())
            .collect()
    }

    #[test]
    fn upstream_filter_cases() {
        let cases: &[(&str, &[usize])] = &[
            ("name", &[0, 1, 2, 3, 4, 5, 6, 7, 8]),
            ("labels.foo", &[0, 2, 8]),
            ("labels.foo,name", &[0, 2, 8]),
            ("labels.foo==true", &[0]),
            ("labels.foo==omg_asdf.asdf-qwer", &[8]),
            ("name==bar", &[1, 3]),
            ("name!=bar", &[0, 2, 4, 5, 6, 7, 8]),
            ("name==bar,labels.bar", &[3]),
            (r#"other=="too complex, yo""#, &[6]),
            ("other~=[abc]+,name!=foo", &[6, 7]),
            ("other~=/[abc]+/,name!=foo", &[6, 7]),
            ("other~=/[abc]{1,2}/,name!=foo", &[6, 7]),
            (r#"other~=/[abc]{0,1}"\//,name!=foo"#, &[]),
            ("name==bar,labels.bar==true", &[3]),
            ("name==bar,labels.bar==wrong", &[]),
            (r#"name==foo,labels."more complex label""#, &[2]),
            (
                r#"labels."more complex label with \\ and \""==present"#,
                &[4],
            ),
            (
                r#"labels."more complex label with \\ and \"".post==present"#,
                &[5],
            ),
            (" name == bar,labels.bar", &[3]),
        ];
        for (filter, want) in cases {
            assert_eq!(corpus(filter), *want, "{filter}");
        }
    }

    #[test]
    fn upstream_syntax_errors() {
        let cases = [
            (
                "labels.|foo|==omg_asdf.asdf-qwer",
                "[labels. >|||< foo|==omg_asdf.asdf-qwer]: invalid quote encountered",
            ),
            (
                r#"labels.?"more complex label with \\ and \"".post==present"#,
                r#"[labels. >|?|< "more complex label with \\ and \"".post==present]: expected field or quoted"#,
            ),
            ("name==foo,", "[name==foo,]: expected field or quoted"),
            ("labels.", "[labels.]: expected field or quoted"),
            (
                "image~=,id?=?fbaq",
                "[image~= >|,|< id?=?fbaq]: expected value or quoted",
            ),
            (
                "labels.ns/key==value",
                "[labels.ns >|/|< key==value]: quoted literal not terminated",
            ),
            (
                "labels.key==/value",
                "[labels.key== >|/|< value]: quoted literal not terminated",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(
                syntax_error(input),
                format!("filters: parse error: {want}"),
                "{input}"
            );
        }
    }

    #[test]
    fn more_syntax_errors() {
        let cases = [
            (" ", "[ ]: expected field or quoted"),
            ("name=foo", r#"[name >|=|< foo]: unsupported operator "=""#),
            (
                "name=!foo",
                r#"[name >|=|< !foo]: unsupported operator "=!""#,
            ),
            (
                "name foo",
                r#"[name  >|f|< oo]: expected an operator ("=="|"!="|"~=")"#,
            ),
            (
                "name==foo bar",
                "[name==foo >| |< bar]: unexpected input:  ",
            ),
            (
                "labels.foo-bar",
                r#"[labels.foo >|-|< bar]: expected an operator ("=="|"!="|"~=")"#,
            ),
            (
                "name==\"foo\"bar",
                "[name==\"foo\" >|b|< ar]: unexpected input: b",
            ),
            (
                r#"labels."\g""#,
                r#"[labels. >|"|< \g"]: illegal escape sequence"#,
            ),
            (
                r#"labels."\xaz""#,
                r#"[labels. >|"|< \xaz"]: illegal numeric escape sequence"#,
            ),
            (
                "labels.\"a\nb\"==v",
                "[labels. >|\"|< a\nb\"==v]: quoted literal not terminated",
            ),
            ("foo\0bar", "[foo >|\0|< bar]: unexpected null"),
            (
                r#"name=="\400""#,
                r#"[name== >|"|< \400"]: unquoting failed: quote syntax error"#,
            ),
            (
                r#"name=="\xff""#,
                r#"[name== >|"|< \xff"]: unquoting failed: escapes do not form valid UTF-8"#,
            ),
            (
                r#"name=="a\/b""#,
                r#"[name== >|"|< a\/b"]: illegal escape sequence"#,
            ),
            ("name==/a/", "[name== >|/|< a/]: invalid quote encountered"),
            ("name~=.*", "[name~= >|.|< *]: expected value or quoted"),
            (
                "name ,x",
                r#"[name  >|,|< x]: expected an operator ("=="|"!="|"~=")"#,
            ),
            (
                "labels.ключ",
                "[labels. >|к|< люч]: expected field or quoted",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(
                syntax_error(input),
                format!("filters: parse error: {want}"),
                "{input:?}"
            );
        }
        // One bad string spoils the whole list.
        assert!(Filter::parse_all(&["name==a", "name=="]).is_err());
    }

    #[test]
    fn invalid_regex_is_an_error() {
        let err = Filter::parse_all(&["name==x,other~=[abc"]).unwrap_err();
        let FilterError::Regex {
            position,
            ref pattern,
            ..
        } = err
        else {
            panic!("{err:?}")
        };
        assert_eq!((position, pattern.as_str()), (15, "[abc"));
        assert!(err.to_string().starts_with(
            r#"filters: invalid regular expression "[abc" at [name==x,other~= >|[|< abc]: "#
        ));
    }

    /// A single object with the given fields; label `k` reads `labels.k`.
    fn one(filter: &str, fields: &[(&str, &str)]) -> bool {
        let filter = Filter::parse_all(&[filter]).unwrap_or_else(|e| panic!("{e}"));
        filter.matches(|path| {
            fields
                .iter()
                .find(|(k, _)| *k == path.join("."))
                .map(|(_, v)| (*v).into())
        })
    }

    #[test]
    fn quoted_values_and_escapes() {
        let fields = [
            ("labels.k", "a\tbAé\"A|/"),
            ("labels.a.b", "x"),
            ("labels.a,b", "y"),
        ];
        assert!(one(r#"labels.k=="a\tb\x41\u00e9\"\101|/""#, &fields));
        assert!(one(r#"labels.k=="a\tb\x41\U000000e9\"\101|/""#, &fields));
        assert!(!one(r#"labels.k=="a\\tb""#, &fields));
        assert!(one(
            r#"labels."a.b"==x,labels.a.b==x,labels."a,b"=="y""#,
            &fields
        ));
        assert!(one(r#"labels."a\x2cb""#, &fields));
        assert!(one(r#"labels.k~=/b\x41é"/"#, &fields));
        assert!(one(r#"labels.k~=|\|/$|"#, &fields));
        assert!(one(r#"labels.k~=/[|]\/$/"#, &fields));
    }

    #[test]
    fn bare_values_take_punctuation() {
        let fields = [
            ("name", "docker.io/library/busybox:1.36@sha256:ab-c_d"),
            ("x", "b==c~!x"),
        ];
        assert!(one(
            "name==docker.io/library/busybox:1.36@sha256:ab-c_d",
            &fields
        ));
        assert!(one("x==b==c~!x,name", &fields));
        assert!(one("x!=b==c~!y", &fields));
        assert!(one("name~=^docker\\.io/.*:1\\.36", &fields));
        assert!(one("name~=busybox,name~=/sha256:[a-f]+-/", &fields));
        assert!(!one("name~=^busybox", &fields));
        let cow = [("name", "牛"), ("labels.moo", "true")];
        assert!(one("name~=牛,labels.moo==true", &cow));
        assert!(one("name~=|牛|,labels.moo", &cow));
        assert!(one("name==牛", &cow));
    }

    #[test]
    fn absent_fields() {
        let fields = [("name", "n"), ("empty", "")];
        // `!=` compares an absent field as the empty string.
        assert!(one("labels.missing!=x", &fields));
        assert!(!one(r#"labels.missing!="""#, &fields));
        assert!(!one(r#"empty!="""#, &fields));
        assert!(one("empty!=x,name!=m", &fields));
        // `==` never matches an absent field, even against "".
        assert!(!one(r#"labels.missing=="""#, &fields));
        assert!(one(r#"empty=="""#, &fields));
        // `~=` matches the regex against "" for an absent field; presence is explicit.
        assert!(one("labels.missing~=^$", &fields));
        assert!(!one("labels.missing~=/./", &fields));
        assert!(!one("labels.missing", &fields));
        assert!(one("empty", &fields));
    }
}
