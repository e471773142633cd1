//! containerd's filter expression language (`github.com/containerd/containerd/filters`,
//! as of containerd 1.6): parsing the `filters` strings of requests such as
//! `Snapshots.List` and matching them against an object's fields.
//!
//! Grammar of one string:
//!
//! ```text
//! selectors := selector ("," selector)*
//! selector  := fieldpath (operator value)?
//! fieldpath := field ("." field)*
//! field     := quoted | [A-Za-z0-9_]+
//! operator  := "==" | "!=" | "~="
//! value     := quoted | graphic runes up to "," or space (not starting with , . = ! ~ / | ")
//! quoted    := "..." with Go escapes; a `~=` value may also be quoted as /.../ or |...|
//! ```
//!
//! Selectors within a string are AND'ed, the strings of a list are OR'ed, and
//! an empty list or an empty string matches everything. A bare fieldpath tests
//! presence. As in containerd, `!=` and `~=` see an absent field as `""`, while
//! `==` never matches an absent field.

use std::sync::LazyLock;

use regex::{Regex, RegexBuilder};

/// A parsed list of filter expressions (OR of ANDs).
#[derive(Debug, Clone)]
pub struct Filter {
    /// Matches if any conjunction matches; an empty conjunction matches all.
    any_of: Vec<Vec<Selector>>,
}

/// Why a filter failed to parse. containerd reports all of these to clients as
/// `InvalidArgument`. Positions are byte offsets into `input`.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// The input is not in the filter grammar; the message is containerd's.
    #[error("filters: parse error: {}: {message}", located(input, *position))]
    Syntax {
        input: String,
        position: usize,
        message: String,
    },
    /// The value of a `~=` selector is not a valid regular expression.
    #[error("filters: invalid regular expression {pattern:?} at {}: {source}", located(input, *position))]
    Regex {
        input: String,
        position: usize,
        pattern: String,
        source: regex::Error,
    },
}

/// Renders `input` with the rune at `pos` marked, as containerd does.
fn located(input: &str, pos: usize) -> String {
    match input.get(pos..).and_then(|rest| rest.chars().next()) {
        Some(c) => format!(
            "[{} >|{c}|< {}]",
            &input[..pos],
            &input[pos + c.len_utf8()..]
        ),
        None => format!("[{input}]"),
    }
}

impl Filter {
    /// Parses each string; the result matches if any of them matches. Empty list → matches all.
    pub fn parse_all<S: AsRef<str>>(exprs: &[S]) -> Result<Filter, FilterError> {
        let parsed = exprs.iter().map(|e| Parser::new(e.as_ref()).parse());
        let mut any_of: Vec<_> = parsed.collect::<Result<_, _>>()?;
        if any_of.is_empty() {
            any_of.push(Vec::new());
        }
        Ok(Filter { any_of })
    }

    /// `field(path)` returns the field's value if present, e.g. for `["labels", "l"]` the label's value.
    pub fn matches(&self, field: impl Fn(&[String]) -> Option<String>) -> bool {
        let all = |selectors: &Vec<Selector>| selectors.iter().all(|s| s.matches(&field));
        self.any_of.iter().any(all)
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

/// A quoted literal's value, or why its escapes do not decode.
type Decoded = Result<String, &'static str>;

enum Token<'a> {
    Eof,
    /// A quoted literal: its quote rune and decoded value.
    Quoted(char, Decoded),
    Value(&'a str),
    Field(&'a str),
    /// `,` or `.`.
    Separator,
    /// A run of `=`, `!` and `~`, not necessarily a valid operator.
    Operator(&'a str),
    /// Any other rune.
    Unexpected,
}

/// Value runes: Go's `unicode.IsGraphic` minus whitespace, `,` and U+FFFD.
static VALUE_RUN: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\A[[\p{L}\p{M}\p{N}\p{P}\p{S}]&&[^,\x{FFFD}]]*").expect("valid value-rune regex")
});

/// Runes containerd's scanner rejects anywhere: NUL, and U+FFFD, which Go
/// cannot tell apart from invalid UTF-8.
fn illegal(c: char) -> Option<&'static str> {
    match c {
        '\0' => Some("unexpected null"),
        char::REPLACEMENT_CHARACTER => Some("rune error"),
        _ => None,
    }
}

fn is_field_char(c: char) -> bool {
    c == '_' || c.is_ascii_alphanumeric()
}

fn push_char(out: &mut Option<Vec<u8>>, c: char) {
    if let Some(out) = out {
        out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
    }
}

/// Tokenizer. After an operator it is in value mode, where a bare token runs
/// to the next comma or whitespace instead of stopping at non-field runes.
#[derive(Default)]
struct Scanner<'a> {
    input: &'a str,
    /// Start of the rune last returned by `next`; `ppos` is its end.
    pos: usize,
    ppos: usize,
    value: bool,
    /// The first error seen; sticky, as in containerd.
    err: Option<&'static str>,
}

impl<'a> Scanner<'a> {
    fn error(&mut self, msg: &'static str) {
        self.err.get_or_insert(msg);
    }

    fn next(&mut self) -> Option<char> {
        self.pos = self.ppos;
        let c = self.peek()?;
        self.ppos += c.len_utf8();
        if let Some(msg) = illegal(c) {
            self.error(msg);
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

    /// Returns a token and its start, or an illegal token's start and error.
    fn scan(&mut self) -> Result<(usize, Token<'a>), (usize, &'static str)> {
        loop {
            let ch = self.next();
            let start = self.pos;
            let token = match ch {
                None => Token::Eof,
                Some(c) if illegal(c).is_some() => {
                    return Err((start, self.err.unwrap_or_default()))
                }
                Some(c) if c.is_whitespace() => continue,
                Some(quote @ ('/' | '|' | '"')) => {
                    let decoded = self.scan_quoted(quote).map_err(|msg| (start, msg))?;
                    Token::Quoted(quote, decoded)
                }
                Some(',' | '.') => {
                    self.value = false;
                    Token::Separator
                }
                Some('=' | '!' | '~') => {
                    self.eat_while(|c| matches!(c, '=' | '!' | '~'));
                    self.value = true;
                    Token::Operator(&self.input[start..self.ppos])
                }
                Some(_) if self.value => {
                    // The first rune is taken as is; the rest must be value runes.
                    let rest = &self.input[self.ppos..];
                    self.ppos += VALUE_RUN.find(rest).map_or(0, |m| m.end());
                    self.value = false;
                    Token::Value(&self.input[start..self.ppos])
                }
                Some(c) if is_field_char(c) => {
                    self.eat_while(is_field_char);
                    Token::Field(&self.input[start..self.ppos])
                }
                Some(_) => Token::Unexpected,
            };
            return Ok((start, token));
        }
    }

    /// Scans the rest of a quoted literal and decodes it. Scanning errors come
    /// first; decoding errors are reported by the parser after it has checked
    /// that this kind of quote is allowed, as containerd does.
    fn scan_quoted(&mut self, quote: char) -> Result<Decoded, &'static str> {
        // Bytes, as `\x` and octal escapes give single bytes; None if undecodable.
        let (mut out, mut legal) = (Some(Vec::new()), true);
        let mut ch = self.next();
        while ch != Some(quote) {
            match ch {
                Some('\\') => {
                    let (after, ok) = self.scan_escape(quote, &mut out);
                    (ch, legal) = (after, legal && ok);
                }
                Some(c) if c != '\n' && illegal(c).is_none() => {
                    push_char(&mut out, c);
                    ch = self.next();
                }
                _ => {
                    self.error("quoted literal not terminated");
                    return Err(self.err.unwrap_or_default());
                }
            }
        }
        if !legal {
            return Err(self.err.unwrap_or_default());
        }
        let utf8 = |bytes| String::from_utf8(bytes).map_err(|_| "escapes do not form valid UTF-8");
        Ok(out.ok_or("quote syntax error").and_then(utf8))
    }

    /// Consumes an escape after `\` and appends its value to `out`. Returns the
    /// rune after it and whether the escape was legal.
    fn scan_escape(&mut self, quote: char, out: &mut Option<Vec<u8>>) -> (Option<char>, bool) {
        let (mut ch, radix, digits) = match self.next() {
            Some(c) if c == quote || "abfnrtv\\".contains(c) => {
                const CODES: [char; 7] = ['\x07', '\x08', '\x0c', '\n', '\r', '\t', '\x0b'];
                push_char(out, "abfnrtv".find(c).map_or(c, |i| CODES[i]));
                return (self.next(), true);
            }
            Some(c @ '0'..='7') => (Some(c), 8, 3),
            Some('x') => (self.next(), 16, 2),
            Some('u') => (self.next(), 16, 4),
            Some('U') => (self.next(), 16, 8),
            other => {
                self.error("illegal escape sequence");
                return (other, false);
            }
        };
        let mut code = 0;
        for _ in 0..digits {
            let Some(digit) = ch.and_then(|c| c.to_digit(radix)) else {
                self.error("illegal numeric escape sequence");
                return (ch, false);
            };
            code = code * radix + digit;
            ch = self.next();
        }
        match (radix, digits) {
            // One byte, as in Go; octal above 255 does not decode.
            (8, _) | (16, 2) if code <= 0xff => out.iter_mut().for_each(|o| o.push(code as u8)),
            // Go encodes surrogate halves as U+FFFD.
            (16, 4 | 8) if code <= char::MAX as u32 => push_char(
                out,
                char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER),
            ),
            _ => *out = None,
        }
        (ch, true)
    }
}

/// Recursive-descent parser over one filter string.
struct Parser<'a> {
    input: &'a str,
    scanner: Scanner<'a>,
}

impl<'a> Parser<'a> {
    fn new(input: &'a str) -> Self {
        let scanner = Scanner {
            input,
            ..Scanner::default()
        };
        Parser { input, scanner }
    }

    fn error(&self, position: usize, message: impl Into<String>) -> FilterError {
        let (input, message) = (self.input.to_owned(), message.into());
        FilterError::Syntax {
            input,
            position,
            message,
        }
    }

    fn scan(&mut self) -> Result<(usize, Token<'a>), FilterError> {
        self.scanner
            .scan()
            .map_err(|(pos, msg)| self.error(pos, msg))
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
                    self.scan()?;
                    selectors.push(self.selector()?);
                }
                Some(c) => {
                    let c = illegal(c).map_or(c, |_| char::REPLACEMENT_CHARACTER);
                    return Err(self.error(self.scanner.ppos, format!("unexpected input: {c}")));
                }
            }
        }
    }

    fn selector(&mut self) -> Result<Selector, FilterError> {
        let mut path = vec![self.field()?];
        while self.scanner.peek() == Some('.') {
            self.scan()?;
            path.push(self.field()?);
        }
        let op = match self.scanner.peek() {
            None | Some(',') => Op::Present,
            Some(_) => self.operation()?,
        };
        Ok(Selector { path, op })
    }

    fn field(&mut self) -> Result<String, FilterError> {
        match self.scan()? {
            (_, Token::Field(s)) => Ok(s.to_owned()),
            (pos, Token::Quoted(quote, decoded)) => self.unquote(pos, quote, decoded, false),
            (pos, _) => Err(self.error(pos, "expected field or quoted")),
        }
    }

    /// An operator and its value.
    fn operation(&mut self) -> Result<Op, FilterError> {
        let op = match self.scan()? {
            (_, Token::Operator(op @ ("==" | "!=" | "~="))) => op,
            (pos, Token::Operator(op)) => {
                return Err(self.error(pos, format!("unsupported operator {op:?}")))
            }
            (pos, _) => return Err(self.error(pos, r#"expected an operator ("=="|"!="|"~=")"#)),
        };
        let (position, value) = match self.scan()? {
            (pos, Token::Value(s) | Token::Field(s)) => (pos, s.to_owned()),
            // Only regular expressions may be quoted as /.../ or |...|.
            (pos, Token::Quoted(q, decoded)) => (pos, self.unquote(pos, q, decoded, op == "~=")?),
            (pos, _) => return Err(self.error(pos, "expected value or quoted")),
        };
        Ok(match op {
            "==" => Op::Equal(value),
            "!=" => Op::NotEqual(value),
            // Go's regexp accepts octal escapes such as `\101`.
            _ => match RegexBuilder::new(&value).octal(true).build() {
                Ok(re) => Op::Matches(re),
                Err(source) => {
                    let (input, pattern) = (self.input.to_owned(), value);
                    return Err(FilterError::Regex {
                        input,
                        position,
                        pattern,
                        source,
                    });
                }
            },
        })
    }

    fn unquote(
        &self,
        pos: usize,
        quote: char,
        value: Decoded,
        alt: bool,
    ) -> Result<String, FilterError> {
        if quote != '"' && !alt {
            return Err(self.error(pos, "invalid quote encountered"));
        }
        value.map_err(|e| self.error(pos, format!("unquoting failed: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Indices of the `items` that the filters select.
    fn select<T>(
        filters: &[&str],
        items: &[T],
        field: fn(&T, &[String]) -> Option<String>,
    ) -> Vec<usize> {
        let filter = Filter::parse_all(filters).unwrap_or_else(|e| panic!("{filters:?}: {e}"));
        let selected = |i: &usize| filter.matches(|path| field(&items[*i], path));
        (0..items.len()).filter(selected).collect()
    }

    /// The snapshots checkWalk creates: name, kind, parent and label `l`; all
    /// are labelled `containerd.io/gc.root=check-walk`.
    const SNAPSHOTS: &[[&str; 4]] = &[
        ["a-np", "active", "", ""],
        ["p", "committed", "", ""],
        ["a", "active", "p", ""],
        ["v", "view", "p", ""],
        ["p-wl", "committed", "", "1"],
        ["a-wl", "active", "p-wl", "2"],
        ["v-wl", "view", "p-wl", "3"],
        ["a-np-wl", "active", "", "2"],
    ];

    /// Mirrors containerd's metadata `adaptSnapshot`: `parent` is always present.
    fn snapshot_field(&[name, kind, parent, l]: &[&str; 4], path: &[String]) -> Option<String> {
        let value = match (path[0].as_str(), path[1..].join(".").as_str()) {
            ("kind", "") => kind,
            ("name", "") => name,
            ("parent", "") => parent,
            ("labels", "containerd.io/gc.root") => "check-walk",
            ("labels", "l") if !l.is_empty() => l,
            _ => return None,
        };
        Some(value.to_owned())
    }

    #[test]
    fn check_walk_filters() {
        // `;` separates the strings of one request; ROOT is checkWalk's
        // `labels."containerd.io/gc.root"==check-walk`.
        let cases = [
            ("ROOT", "a-np p a v p-wl a-wl v-wl a-np-wl"),
            ("kind==active,ROOT", "a-np a a-wl a-np-wl"),
            ("kind==view,ROOT", "v v-wl"),
            ("kind==committed,ROOT", "p p-wl"),
            ("name==p;name==a-np-wl", "p a-np-wl"),
            ("name==a-wl,labels.l", "a-wl"),
            ("parent==p", "a v"),
            (r#"parent!="",ROOT"#, "a v a-wl v-wl"),
            ("labels.l", "p-wl a-wl v-wl a-np-wl"),
            ("labels.l==2", "a-wl a-np-wl"),
            // Not in checkWalk: an empty string matches everything.
            ("name==nope;", "a-np p a v p-wl a-wl v-wl a-np-wl"),
        ];
        for (filters, want) in cases {
            let filters = filters.replace("ROOT", r#"labels."containerd.io/gc.root"==check-walk"#);
            let filters: Vec<_> = filters.split(';').collect();
            let got = select(&filters, SNAPSHOTS, snapshot_field).into_iter();
            assert_eq!(
                got.map(|i| SNAPSHOTS[i][0]).collect::<Vec<_>>().join(" "),
                want
            );
        }
        assert_eq!(
            select(&[], SNAPSHOTS, snapshot_field).len(),
            SNAPSHOTS.len()
        );
    }

    /// `[name, other, labels as key=value lines]`: containerd's filter_test.go corpus.
    const CORPUS: &[[&str; 3]] = &[
        ["foo", "", "foo=true"],
        ["bar", "", ""],
        ["foo", "", "foo=present\nmore complex label=present"],
        ["bar", "", "bar=true"],
        ["fooer", "", "more complex label with \\ and \"=present"],
        [
            "fooer",
            "",
            "more complex label with \\ and \".post=present",
        ],
        ["baz", "too complex, yo", ""],
        ["bazo", "abc", ""],
        ["compound", "", "foo=omg_asdf.asdf-qwer"],
    ];

    fn corpus_field(&[name, other, labels]: &[&str; 3], path: &[String]) -> Option<String> {
        let value = match (path[0].as_str(), path[1..].join(".")) {
            ("name", _) => Some(name),
            ("other", _) => Some(other),
            ("labels", key) => labels
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{key}="))),
            _ => None,
        };
        value
            .filter(|v| !v.is_empty() || path[0] == "labels")
            .map(str::to_owned)
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
            assert_eq!(select(&[filter], CORPUS, corpus_field), *want, "{filter}");
        }
    }

    fn parse_error(input: &str) -> FilterError {
        Filter::parse_all(&["name", input]).expect_err(input)
    }

    #[test]
    fn syntax_errors() {
        let field = "expected field or quoted";
        let value = "expected value or quoted";
        let op = r#"expected an operator ("=="|"!="|"~=")"#;
        let quote = "invalid quote encountered";
        let unterminated = "quoted literal not terminated";
        let escape = "illegal escape sequence";
        let undecodable = "unquoting failed: quote syntax error";
        let cases = [
            // From containerd's filter_test.go.
            ("labels.|foo|==omg_asdf.asdf-qwer", 7, quote),
            (
                r#"labels.?"more complex label with \\ and \"".post==present"#,
                7,
                field,
            ),
            ("name==foo,", 10, field),
            ("labels.", 7, field),
            ("image~=,id?=?fbaq", 7, value),
            ("labels.ns/key==value", 9, unterminated),
            ("labels.key==/value", 12, unterminated),
            // More.
            (" ", 1, field),
            ("labels.ключ", 7, field),
            ("name=foo", 4, r#"unsupported operator "=""#),
            ("name=!foo", 4, r#"unsupported operator "=!""#),
            ("name foo", 5, op),
            ("name ,x", 5, op),
            ("labels.foo-bar", 10, op),
            ("name==foo bar", 9, "unexpected input:  "),
            ("name==\"foo\"bar", 11, "unexpected input: b"),
            ("name~=.*", 6, value),
            ("name==/a/", 6, quote),
            (r#"labels."\g""#, 7, escape),
            (r#"name=="a\/b""#, 6, escape),
            (r#"labels."\xaz""#, 7, "illegal numeric escape sequence"),
            ("labels.\"a\nb\"==v", 7, unterminated),
            ("foo\0bar", 3, "unexpected null"),
            ("name==\"a\0\"", 6, "unexpected null"),
            ("name==a\u{FFFD}", 7, "unexpected input: \u{FFFD}"),
            (r#"name=="\400""#, 6, undecodable),
            (r#"name=="\U00110000""#, 6, undecodable),
            (
                r#"name=="\xff""#,
                6,
                "unquoting failed: escapes do not form valid UTF-8",
            ),
        ];
        for (input, pos, message) in cases {
            let want = format!("filters: parse error: {}: {message}", located(input, pos));
            assert_eq!(parse_error(input).to_string(), want, "{input:?}");
        }
        // containerd's rendering of the input and position.
        let want =
            "filters: parse error: [labels.ns >|/|< key==value]: quoted literal not terminated";
        assert_eq!(parse_error("labels.ns/key==value").to_string(), want);
        let want = "filters: parse error: [name==foo,]: expected field or quoted";
        assert_eq!(parse_error("name==foo,").to_string(), want);
    }

    #[test]
    fn invalid_regex_is_an_error() {
        let err = parse_error("name==x,other~=[abc");
        let FilterError::Regex {
            position,
            ref pattern,
            ..
        } = err
        else {
            panic!("{err:?}")
        };
        assert_eq!((position, pattern.as_str()), (15, "[abc"));
        let want = r#"filters: invalid regular expression "[abc" at [name==x,other~= >|[|< abc]: "#;
        assert!(err.to_string().starts_with(want), "{err}");
    }

    #[test]
    fn operators_escapes_and_absent_fields() {
        let object = [
            "name=docker.io/library/busybox:1.36@sha256:ab-c_d",
            "labels.k=a\tbAé\"A|/",
            "labels.a.b=x",
            "labels.a,b=y",
            "labels.cow=牛",
            "x=b==c~!x",
            "empty=",
        ];
        let cases = [
            // Bare values run to a comma or whitespace.
            ("name==docker.io/library/busybox:1.36@sha256:ab-c_d", true),
            ("x==b==c~!x,labels.cow==牛", true),
            ("x!=b==c~!y", true),
            // Quoted fields and values, with Go escapes.
            (r#"labels.k=="a\tb\x41\u00e9\"\101|/""#, true),
            (r#"labels.k=="a\tb\x41\U000000e9\"\101|/""#, true),
            (r#"labels.k=="a\tb\x41\xc3\xa9\"\101|/""#, true),
            (r#"labels.k=="a\\tb""#, false),
            (r#"labels."a.b"==x,labels.a.b==x,labels."a,b"=="y""#, true),
            (r#"labels."a\x2cb""#, true),
            // Regular expressions search, bare or quoted.
            (r"name~=^docker\.io/.*:1\.36", true),
            ("name~=busybox,name~=/sha256:[a-f]+-/", true),
            ("name~=^busybox", false),
            (r#"labels.k~=/b\x41é"/"#, true),
            (r"labels.k~=|\|/$|", true),
            (r"labels.k~=/[|]\/$/", true),
            (r"labels.k~=\101\|", true),
            ("labels.cow~=|牛|", true),
            // `!=` and `~=` see an absent field as "", `==` never matches one.
            ("labels.missing!=x", true),
            (r#"labels.missing!="""#, false),
            (r#"empty!="""#, false),
            ("empty!=x,name!=m", true),
            (r#"labels.missing=="""#, false),
            (r#"empty=="""#, true),
            ("labels.missing~=^$", true),
            ("labels.missing~=/./", false),
            ("labels.missing", false),
            ("empty", true),
        ];
        let field = |object: &[&str; 7], path: &[String]| {
            let key = format!("{}=", path.join("."));
            object
                .iter()
                .find_map(|f| f.strip_prefix(&key))
                .map(str::to_owned)
        };
        for (filter, want) in cases {
            assert_eq!(select(&[filter], &[object], field) == [0], want, "{filter}");
        }
    }
}
