//! A small, safe arithmetic evaluator: a hand-written recursive-descent parser over `f64`.
//!
//! Grammar (whitespace allowed between tokens):
//!
//! ```text
//! expr    = term { ("+" | "-") term }
//! term    = unary { ("*" | "×" | "/" | "÷" | "%") unary }
//! unary   = ("-" | "+") unary | power
//! power   = primary [ ("^" | "**") unary ]          (right-associative: 2^3^2 = 2^9)
//! primary = number | "(" expr ")"
//! number  = digits [ "." digits ] [ ("e" | "E") [ "+" | "-" ] digits ]   (or "." digits)
//! ```
//!
//! `-2^2` is `-(2^2)`. Input is bounded in length and nesting depth, every intermediate result
//! must be finite, and nothing but arithmetic is ever evaluated.

use std::fmt;

/// The longest expression accepted, in characters.
pub const MAX_LEN: usize = 1000;

/// The deepest nesting accepted (parentheses, signs and exponents).
pub const MAX_DEPTH: usize = 64;

/// Why an expression has no value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArithError {
    /// Nothing to evaluate.
    Empty,
    /// Longer than [`MAX_LEN`].
    TooLong(usize),
    /// Nested deeper than [`MAX_DEPTH`].
    TooDeep,
    /// Something unexpected at a (1-based) character position.
    Unexpected {
        /// What was found.
        found: String,
        /// Where, counting characters from 1.
        position: usize,
    },
    /// A `(` that is never closed.
    Unclosed(usize),
    /// A `)` without its `(`.
    Unmatched(usize),
    /// A malformed number.
    BadNumber(String, usize),
    /// Division or remainder by zero.
    DivisionByZero,
    /// A result too large to represent.
    Overflow,
    /// A result that is not a real number (e.g. `(-8)^0.5`).
    NotReal,
}

impl ArithError {
    /// Whether the expression itself is malformed (as opposed to its value being undefined).
    pub fn is_syntax(&self) -> bool {
        !matches!(self, ArithError::DivisionByZero | ArithError::Overflow | ArithError::NotReal)
    }
}

impl fmt::Display for ArithError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArithError::Empty => write!(f, "the expression is empty"),
            ArithError::TooLong(n) => write!(f, "the expression has {n} characters; the limit is {MAX_LEN}"),
            ArithError::TooDeep => write!(f, "the expression nests deeper than {MAX_DEPTH} levels"),
            ArithError::Unexpected { found, position } => {
                write!(f, "unexpected {found} at position {position}")
            }
            ArithError::Unclosed(p) => write!(f, "the parenthesis at position {p} is never closed"),
            ArithError::Unmatched(p) => {
                write!(f, "the closing parenthesis at position {p} has no opening one")
            }
            ArithError::BadNumber(n, p) => write!(f, "invalid number {n:?} at position {p}"),
            ArithError::DivisionByZero => write!(f, "division by zero"),
            ArithError::Overflow => write!(f, "the result is too large"),
            ArithError::NotReal => write!(f, "the result is not a real number"),
        }
    }
}

impl std::error::Error for ArithError {}

/// Evaluates an arithmetic expression.
pub fn evaluate(expression: &str) -> Result<f64, ArithError> {
    let chars: Vec<char> = expression.chars().collect();
    if chars.len() > MAX_LEN {
        return Err(ArithError::TooLong(chars.len()));
    }
    if chars.iter().all(|c| c.is_whitespace()) {
        return Err(ArithError::Empty);
    }
    let mut parser = Parser { chars, pos: 0, depth: 0 };
    let value = parser.expr()?;
    parser.skip_ws();
    match parser.peek() {
        None => Ok(value),
        Some(')') => Err(ArithError::Unmatched(parser.pos + 1)),
        Some(_) => Err(parser.unexpected()),
    }
}

/// Formats a result: integers without `.0`, others with at most 12 decimals, extremes in
/// scientific notation.
pub fn format_number(value: f64) -> String {
    if value == 0.0 {
        return "0".to_owned();
    }
    let magnitude = value.abs();
    if value.fract() == 0.0 && magnitude < 1e16 {
        return format!("{value:.0}");
    }
    if (1e-6..1e16).contains(&magnitude) {
        let fixed = format!("{value:.12}");
        return fixed.trim_end_matches('0').trim_end_matches('.').to_owned();
    }
    format!("{value:e}")
}

struct Parser {
    chars: Vec<char>,
    pos: usize,
    depth: usize,
}

impl Parser {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
    }

    /// Skips whitespace, then consumes `c` if it is next.
    fn eat(&mut self, c: char) -> bool {
        self.skip_ws();
        if self.peek() == Some(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn unexpected(&self) -> ArithError {
        let found = match self.peek() {
            Some(c) => format!("{c:?}"),
            None => "end of expression".to_owned(),
        };
        ArithError::Unexpected { found, position: self.pos + 1 }
    }

    /// Runs `f` one nesting level deeper.
    fn nested(&mut self, f: impl FnOnce(&mut Self) -> Result<f64, ArithError>) -> Result<f64, ArithError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(ArithError::TooDeep);
        }
        let value = f(self);
        self.depth -= 1;
        value
    }

    fn expr(&mut self) -> Result<f64, ArithError> {
        let mut value = self.term()?;
        loop {
            if self.eat('+') {
                value = finite(value + self.term()?)?;
            } else if self.eat('-') {
                value = finite(value - self.term()?)?;
            } else {
                return Ok(value);
            }
        }
    }

    fn term(&mut self) -> Result<f64, ArithError> {
        let mut value = self.unary()?;
        loop {
            if self.eat('*') || self.eat('×') {
                value = finite(value * self.unary()?)?;
            } else if self.eat('/') || self.eat('÷') {
                value = divide(value, self.unary()?, |a, b| a / b)?;
            } else if self.eat('%') {
                value = divide(value, self.unary()?, |a, b| a % b)?;
            } else {
                return Ok(value);
            }
        }
    }

    fn unary(&mut self) -> Result<f64, ArithError> {
        if self.eat('-') {
            self.nested(|p| p.unary().map(|v| -v))
        } else if self.eat('+') {
            self.nested(Self::unary)
        } else {
            self.power()
        }
    }

    fn power(&mut self) -> Result<f64, ArithError> {
        let base = self.primary()?;
        if !self.eat_power() {
            return Ok(base);
        }
        let exponent = self.nested(Self::unary)?;
        finite(base.powf(exponent))
    }

    fn eat_power(&mut self) -> bool {
        if self.eat('^') {
            return true;
        }
        let is_double_star = self.peek() == Some('*') && self.chars.get(self.pos + 1) == Some(&'*');
        if is_double_star {
            self.pos += 2;
        }
        is_double_star
    }

    fn primary(&mut self) -> Result<f64, ArithError> {
        self.skip_ws();
        match self.peek() {
            Some('(') => {
                let open = self.pos + 1;
                self.pos += 1;
                let value = self.nested(Self::expr)?;
                if self.eat(')') { Ok(value) } else { Err(self.unclosed(open)) }
            }
            Some(c) if c.is_ascii_digit() || c == '.' => self.number(),
            _ => Err(self.unexpected()),
        }
    }

    /// At a point where `)` was expected: the end of input means the `(` is never closed.
    fn unclosed(&self, open: usize) -> ArithError {
        if self.peek().is_none() { ArithError::Unclosed(open) } else { self.unexpected() }
    }

    fn number(&mut self) -> Result<f64, ArithError> {
        let start = self.pos;
        self.digits();
        if self.peek() == Some('.') {
            self.pos += 1;
            self.digits();
        }
        if matches!(self.peek(), Some('e' | 'E')) {
            self.exponent();
        }
        let text: String = self.chars[start..self.pos].iter().collect();
        match text.parse::<f64>() {
            Ok(v) => finite(v),
            Err(_) => Err(ArithError::BadNumber(text, start + 1)),
        }
    }

    fn digits(&mut self) {
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
        }
    }

    /// Consumes `e[+-]digits`; leaves a lone `e` to be reported as unexpected.
    fn exponent(&mut self) {
        let mark = self.pos;
        self.pos += 1;
        if matches!(self.peek(), Some('+' | '-')) {
            self.pos += 1;
        }
        let digits_at = self.pos;
        self.digits();
        if self.pos == digits_at {
            self.pos = mark;
        }
    }
}

fn finite(value: f64) -> Result<f64, ArithError> {
    if value.is_nan() {
        Err(ArithError::NotReal)
    } else if value.is_infinite() {
        Err(ArithError::Overflow)
    } else {
        Ok(value)
    }
}

fn divide(a: f64, b: f64, op: fn(f64, f64) -> f64) -> Result<f64, ArithError> {
    if b == 0.0 { Err(ArithError::DivisionByZero) } else { finite(op(a, b)) }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn eval(text: &str) -> String {
        match evaluate(text) {
            Ok(v) => format_number(v),
            Err(e) => format!("error: {e}"),
        }
    }

    #[test]
    fn precedence_and_associativity() {
        assert_eq!(eval("1 + 2 * 3"), "7");
        assert_eq!(eval("(1 + 2) * 3"), "9");
        assert_eq!(eval("10 - 4 - 3"), "3");
        assert_eq!(eval("100 / 10 / 5"), "2");
        assert_eq!(eval("2 ^ 3 ^ 2"), "512");
        assert_eq!(eval("2 ** 10"), "1024");
        assert_eq!(eval("-2 ^ 2"), "-4");
        assert_eq!(eval("(-2) ^ 2"), "4");
        assert_eq!(eval("2 ^ -1"), "0.5");
        assert_eq!(eval("7 % 3"), "1");
        assert_eq!(eval("-7 % 3"), "-1");
        assert_eq!(eval("2 * -3"), "-6");
        assert_eq!(eval("--3"), "3");
        assert_eq!(eval("+4 - -1"), "5");
        assert_eq!(eval("6 × 7 ÷ 2"), "21");
    }

    #[test]
    fn numbers_and_formatting() {
        assert_eq!(eval("0.1 + 0.2"), "0.3");
        assert_eq!(eval("1 / 3"), "0.333333333333");
        assert_eq!(eval(".5 * 4"), "2");
        assert_eq!(eval("1.5e3"), "1500");
        assert_eq!(eval("2E-3"), "0.002");
        assert_eq!(eval("10 ^ 20"), "1e20");
        assert_eq!(eval("1 / 10 ^ 9"), "1e-9");
        assert_eq!(eval("-0"), "0");
        assert_eq!(eval("  42  "), "42");
        assert_eq!(eval("123456789 * 1000"), "123456789000");
    }

    #[test]
    fn errors_say_what_and_where() {
        assert_eq!(eval(""), "error: the expression is empty");
        assert_eq!(eval("   "), "error: the expression is empty");
        assert_eq!(eval("1 / 0"), "error: division by zero");
        assert_eq!(eval("5 % (2 - 2)"), "error: division by zero");
        assert_eq!(eval("(1 + 2"), "error: the parenthesis at position 1 is never closed");
        assert_eq!(eval("1 + 2)"), "error: the closing parenthesis at position 6 has no opening one");
        assert_eq!(eval("1 +"), "error: unexpected end of expression at position 4");
        assert_eq!(eval("2 x 3"), "error: unexpected 'x' at position 3");
        assert_eq!(eval("()"), "error: unexpected ')' at position 2");
        assert_eq!(eval("2(3)"), "error: unexpected '(' at position 2");
        assert_eq!(eval("1.2.3"), "error: unexpected '.' at position 4");
        assert_eq!(eval("."), "error: invalid number \".\" at position 1");
        assert_eq!(eval("2e"), "error: unexpected 'e' at position 2");
        assert_eq!(eval("10 ^ 400"), "error: the result is too large");
        assert_eq!(eval("(-8) ^ 0.5"), "error: the result is not a real number");
        assert_eq!(eval("1e999"), "error: the result is too large");
        assert_eq!(eval("import os"), "error: unexpected 'i' at position 1");
    }

    #[test]
    fn size_and_depth_are_bounded() {
        let long = "1+".repeat(600) + "1";
        assert_eq!(evaluate(&long), Err(ArithError::TooLong(1201)));
        let deep = "(".repeat(MAX_DEPTH + 1) + "1" + &")".repeat(MAX_DEPTH + 1);
        assert_eq!(evaluate(&deep), Err(ArithError::TooDeep));
        let ok = "(".repeat(MAX_DEPTH) + "1" + &")".repeat(MAX_DEPTH);
        assert_eq!(evaluate(&ok), Ok(1.0));
        assert_eq!(evaluate(&("-".repeat(500) + "1")), Err(ArithError::TooDeep));
        assert_eq!(evaluate(&["2"; 300].join("^")), Err(ArithError::TooDeep));
        let flat = vec!["1"; 400].join("+");
        assert_eq!(evaluate(&flat), Ok(400.0), "long flat sums are not nesting");
    }

    #[test]
    fn syntax_errors_are_told_apart_from_undefined_values() {
        assert!(evaluate("1 +").unwrap_err().is_syntax());
        assert!(!evaluate("1/0").unwrap_err().is_syntax());
    }

    proptest! {
        #[test]
        fn integer_arithmetic_matches_rust(a in -100_000i64..100_000, b in -100_000i64..100_000) {
            prop_assert_eq!(eval(&format!("{a} + {b}")), (a + b).to_string());
            prop_assert_eq!(eval(&format!("{a} - ({b})")), (a - b).to_string());
            prop_assert_eq!(eval(&format!("{a} * {b}")), (a * b).to_string());
        }

        #[test]
        fn any_input_gives_a_value_or_an_error_never_a_panic(text in "[0-9+*/%^().eE -]{0,200}") {
            let _ = evaluate(&text);
        }

        #[test]
        fn any_unicode_input_is_safe(text in "\\PC{0,100}") {
            let _ = evaluate(&text);
        }
    }
}
