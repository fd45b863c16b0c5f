//! Contact details masked wherever nudge shows text it was given (an
//! event's variables, a receiver's refusal): e-mail addresses keep their
//! first letter and domain, phone numbers their last two digits.

/// `alice@example.com` → `a***@example.com`.
pub fn mask_email(email: &str) -> String {
    match email.split_once('@') {
        Some((local, domain)) => {
            let first: String = local.chars().take(1).collect();
            format!("{first}***@{domain}")
        }
        None => "***".into(),
    }
}

/// `+61400000001` → `+*********01`: the last two digits stay.
pub fn mask_phone(phone: &str) -> String {
    let digits = phone.chars().filter(char::is_ascii_digit).count();
    let mut seen = 0;
    phone
        .chars()
        .map(|c| {
            if c.is_ascii_digit() {
                seen += 1;
                if seen + 2 > digits {
                    c
                } else {
                    '*'
                }
            } else {
                c
            }
        })
        .collect()
}

/// E-mail addresses as `a***@example.com`; runs of digits that could be a
/// phone number (seven or more, with `+ ()-` and spaces between) with all
/// but their last two digits as `*`.
pub fn mask_contacts(text: &str) -> String {
    // A link's parts too (`/users/jane@example.org/profile`, `?e=…&x=1`).
    // Not `'`: it may stand in an address (`john.o'brien@example.com`).
    let separator = |c: char| c.is_whitespace() || "\"<>()[]{},;:=/?&#".contains(c);
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while !rest.is_empty() {
        let end = rest.find(separator).unwrap_or(rest.len());
        let (word, tail) = rest.split_at(end);
        // `@`, or `%40` in a link's query.
        let at = word
            .find('@')
            .map(|i| (i, 1))
            .or_else(|| word.to_ascii_lowercase().find("%40").map(|i| (i, 3)));
        match at {
            Some((i, len)) if i > 0 && word[i + len..].contains('.') => {
                out.extend(word[..i].chars().take(1));
                out.push_str("***");
                out.push_str(&word[i..]);
            }
            _ => out.push_str(word),
        }
        let sep_len = tail.chars().next().map_or(0, char::len_utf8);
        out.push_str(&tail[..sep_len]);
        rest = &tail[sep_len..];
    }
    let mut chars: Vec<char> = out.chars().collect();
    let phoneish = |c: char| c.is_ascii_digit() || "+ ()-".contains(c);
    let mut i = 0;
    while i < chars.len() {
        if !chars[i].is_ascii_digit() && chars[i] != '+' {
            i += 1;
            continue;
        }
        let start = i;
        let scan = |dots: bool| {
            let mut end = start;
            while end < chars.len() && (phoneish(chars[end]) || (dots && chars[end] == '.')) {
                end += 1;
            }
            while end > start + 1 && chars[end - 1] == '.' {
                end -= 1;
            }
            end
        };
        // Dots between groups (`0400.123.456`) make one number; a single
        // dot is a decimal point, which ends it.
        i = scan(true);
        let dots = chars[start..i].iter().filter(|&&c| c == '.').count();
        if dots == 1 {
            i = scan(false);
        }
        let digits: Vec<usize> = (start..i).filter(|&k| chars[k].is_ascii_digit()).collect();
        let run: String = chars[start..i].iter().collect();
        let date = run.len() >= 10
            && run
                .char_indices()
                .take(10)
                .all(|(k, c)| matches!(k, 4 | 7) == (c == '-') && (c == '-' || c.is_ascii_digit()));
        let enough = match dots {
            0 | 1 => 7,
            _ => 9,
        };
        if digits.len() >= enough && !date {
            for &k in &digits[..digits.len() - 2] {
                chars[k] = '*';
            }
        }
    }
    chars.into_iter().collect()
}

/// A link's credentials as `***`: the values of query parameters whose name
/// says they are one (`token`, `sig`, `key`, `code`, `session`, …). A signed
/// resume link opens the customer's application to whoever holds it, so a
/// reviewer sees where it leads, not the key to it.
pub fn mask_link_secrets(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains('=') {
        return text.into();
    }
    let secret = |name: &str| {
        let name = name.to_ascii_lowercase();
        [
            "token",
            "secret",
            "sig",
            "pass",
            "auth",
            "session",
            "otp",
            "jwt",
            "key",
            "credential",
        ]
        .iter()
        .any(|part| name.contains(part))
            || ["t", "k", "s", "code", "sid", "nonce", "hash", "pwd"].contains(&name.as_str())
    };
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    // Each `?name=value` or `&name=value` (`;` too, as some servers split;
    // `#name=value`, where sign-in links put their tokens).
    while let Some(at) = rest.find(['?', '&', ';', '#']) {
        out.push_str(&rest[..=at]);
        rest = &rest[at + 1..];
        let name_end = rest
            .find(|c: char| c == '=' || "?&;#\"' <>".contains(c))
            .unwrap_or(rest.len());
        if !rest[name_end..].starts_with('=') || !secret(&rest[..name_end]) {
            continue;
        }
        let value_end = rest[name_end + 1..]
            .find(|c: char| "&;#\"' <>".contains(c))
            .map_or(rest.len(), |i| name_end + 1 + i);
        out.push_str(&rest[..=name_end]);
        if value_end > name_end + 1 {
            out.push_str("***");
        }
        rest = &rest[value_end..];
    }
    out.push_str(rest);
    out.into()
}
