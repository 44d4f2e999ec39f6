//! Quoting for SQL the connector writes itself (identifiers, and literals
//! where a statement cannot take parameters: replication commands, DDL),
//! in one place.

/// An identifier, double-quoted with embedded quotes doubled.
pub fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// A string literal for a replication command, whose parser takes only
/// plain `'...'` literals: quotes doubled. (The walsender's grammar has no
/// backslash escapes.)
pub(crate) fn quote_command_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A string literal for SQL that means the same whatever
/// `standard_conforming_strings` says: an `E''` literal with quotes and
/// backslashes doubled.
pub(crate) fn quote_literal(value: &str) -> String {
    format!("E'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_and_literals_are_quoted_for_their_parser() {
        assert_eq!(quote_ident("plain"), "\"plain\"");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(quote_literal("plain"), "E'plain'");
        assert_eq!(quote_literal(r"o'brien\x"), r"E'o''brien\\x'");
        assert_eq!(quote_command_literal("o'brien"), "'o''brien'");
    }
}
