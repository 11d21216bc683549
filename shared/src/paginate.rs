//! Pages of the API's lists, Kubernetes-style: `?limit=N&continue=TOKEN`. The
//! token is the key of the last item returned (base64url), so the next page
//! starts strictly after it: an item inserted or deleted meanwhile neither shifts
//! nor repeats the others. Pure: the hub hands in the whole list and the
//! query, and gets the page or the reason the query is refused.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

use crate::api::Page;

/// Items per page without `limit`: one page for most fleets, small enough that
/// a page of clusters stays well under a megabyte.
pub const DEFAULT_LIMIT: usize = 500;
/// The largest page: a larger `limit` is cut to it, so one request cannot make
/// the hub serialize its whole history at once.
pub const MAX_LIMIT: usize = 5000;
/// The longest key a token may carry (names are DNS labels and subdomains,
/// ids are numbers): a longer one was not given out by the hub.
const MAX_KEY_BYTES: usize = 1024;

/// Why a list query is refused (a 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PageError {
    #[error(
        "limit must be a whole number from 1 to {max} (a larger one is cut to {max}), not {0:?}",
        max = MAX_LIMIT
    )]
    Limit(String),
    #[error("the continue token is not one this hub gave out: list again without it")]
    Token,
}

/// A key that orders a list and travels in a continue token.
pub trait PageKey: Ord + Sized {
    fn to_text(&self) -> String;
    /// `None` for text no item of the list could have as its key.
    fn from_text(text: &str) -> Option<Self>;
}

impl PageKey for String {
    fn to_text(&self) -> String {
        self.clone()
    }
    fn from_text(text: &str) -> Option<Self> {
        (!text.is_empty() && !text.chars().any(char::is_control)).then(|| text.to_string())
    }
}

/// Drift event ids.
impl PageKey for u64 {
    fn to_text(&self) -> String {
        self.to_string()
    }
    fn from_text(text: &str) -> Option<Self> {
        // Digits only: `+1` or ` 1` were not given out.
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        text.parse().ok()
    }
}

/// A checked list query: how many items, and after which key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest<K> {
    pub limit: usize,
    pub after: Option<K>,
}

impl<K: PageKey> PageRequest<K> {
    /// Reads `limit` and `continue` as the query string gave them. No limit is
    /// `DEFAULT_LIMIT`; a limit over `MAX_LIMIT` is cut to it; 0, a sign, a
    /// fraction or anything not a number is refused. An empty `continue` is the
    /// first page (a client may pass along the token it was not given).
    pub fn parse(limit: Option<&str>, token: Option<&str>) -> Result<Self, PageError> {
        let limit = match limit {
            None => DEFAULT_LIMIT,
            Some(l) => {
                if l.is_empty() || !l.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(PageError::Limit(clip(l)));
                }
                // All digits: only too large to parse, which is over the maximum too.
                let n = l.parse::<u64>().unwrap_or(u64::MAX);
                if n == 0 {
                    return Err(PageError::Limit(clip(l)));
                }
                usize::try_from(n).unwrap_or(usize::MAX).min(MAX_LIMIT)
            }
        };
        let after = match token {
            None | Some("") => None,
            Some(t) => Some(decode_token(t)?),
        };
        Ok(PageRequest { limit, after })
    }
}

/// The query value echoed in an error, cut short: it is the client's input.
fn clip(s: &str) -> String {
    s.chars().take(32).collect()
}

/// The continue token for a page that ended at `key`.
pub fn encode_token<K: PageKey>(key: &K) -> String {
    URL_SAFE_NO_PAD.encode(key.to_text())
}

pub fn decode_token<K: PageKey>(token: &str) -> Result<K, PageError> {
    // Base64 of MAX_KEY_BYTES, rounded up.
    if token.len() > MAX_KEY_BYTES.div_ceil(3) * 4 {
        return Err(PageError::Token);
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| PageError::Token)?;
    if bytes.len() > MAX_KEY_BYTES {
        return Err(PageError::Token);
    }
    let text = String::from_utf8(bytes).map_err(|_| PageError::Token)?;
    K::from_text(&text).ok_or(PageError::Token)
}

/// The page of `items` (in any order; listed by `key`, ascending, each key
/// once) that `req` asks for: up to `limit` items with a key after `after`, and
/// a continue token when more follow.
pub fn page<T, K: PageKey>(
    items: impl IntoIterator<Item = T>,
    key: impl Fn(&T) -> K,
    req: &PageRequest<K>,
) -> Page<T> {
    let mut keyed: Vec<(K, T)> = items
        .into_iter()
        .map(|t| (key(&t), t))
        .filter(|(k, _)| req.after.as_ref().is_none_or(|a| k > a))
        .collect();
    keyed.sort_by(|a, b| a.0.cmp(&b.0));
    let more = keyed.len() > req.limit;
    keyed.truncate(req.limit);
    let continue_token = if more {
        keyed.last().map(|(k, _)| encode_token(k))
    } else {
        None
    };
    Page {
        items: keyed.into_iter().map(|(_, t)| t).collect(),
        continue_token,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("c{i:02}")).collect()
    }

    fn req(limit: Option<&str>, token: Option<&str>) -> PageRequest<String> {
        PageRequest::parse(limit, token).unwrap()
    }

    /// Every item once, in order, whatever order they came in.
    #[test]
    fn pages_walk_the_list_in_order() {
        let mut all = names(7);
        all.reverse();
        let mut seen = Vec::new();
        let mut token: Option<String> = None;
        let mut sizes = Vec::new();
        loop {
            let p = page(
                all.clone(),
                String::clone,
                &req(Some("3"), token.as_deref()),
            );
            sizes.push(p.items.len());
            seen.extend(p.items);
            match p.continue_token {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        assert_eq!(sizes, [3, 3, 1]);
        assert_eq!(seen, names(7));
    }

    #[test]
    fn an_exact_fit_has_no_continue() {
        let p = page(names(3), String::clone, &req(Some("3"), None));
        assert_eq!((p.items.len(), p.continue_token), (3, None));
        let p = page(Vec::<String>::new(), String::clone, &req(None, None));
        assert_eq!((p.items.len(), p.continue_token), (0, None));
    }

    /// The token is the last key: an item inserted before it, or the item it
    /// names deleted, shifts nothing on the next page.
    #[test]
    fn a_page_is_stable_under_inserts_and_deletes() {
        let first = page(names(6), String::clone, &req(Some("3"), None));
        let token = first.continue_token.unwrap();
        assert_eq!(decode_token::<String>(&token).unwrap(), "c02");
        let mut changed = names(6);
        changed.retain(|n| n != "c02");
        changed.push("a-new-first".into());
        let next = page(changed, String::clone, &req(Some("3"), Some(&token)));
        assert_eq!(next.items, ["c03", "c04", "c05"]);
        assert_eq!(next.continue_token, None);
    }

    #[test]
    fn limits() {
        assert_eq!(req(None, None).limit, DEFAULT_LIMIT);
        assert_eq!(req(Some("1"), None).limit, 1);
        assert_eq!(req(Some("5000"), None).limit, MAX_LIMIT);
        assert_eq!(req(Some("5001"), None).limit, MAX_LIMIT);
        assert_eq!(
            req(Some("99999999999999999999999999999999"), None).limit,
            MAX_LIMIT,
            "beyond u64: cut, not refused"
        );
        for bad in [
            "0", "000", "", "-1", "+3", " 3", "3 ", "1.5", "ten", "0x10", "３",
        ] {
            let e = PageRequest::<String>::parse(Some(bad), None).unwrap_err();
            assert!(matches!(e, PageError::Limit(_)), "{bad:?}");
            assert!(e.to_string().contains("from 1 to 5000"), "{e}");
        }
        let long = "x".repeat(10_000);
        let e = PageRequest::<String>::parse(Some(&long), None).unwrap_err();
        assert!(e.to_string().len() < 200, "the input is clipped: {e}");
    }

    #[test]
    fn garbage_tokens_are_refused() {
        let too_long = URL_SAFE_NO_PAD.encode("x".repeat(MAX_KEY_BYTES + 1));
        let control = URL_SAFE_NO_PAD.encode("a\nb");
        let not_utf8 = URL_SAFE_NO_PAD.encode([0xff, 0xfe]);
        for bad in [
            "!!!",
            "a",
            "YWJj=",
            "YW Jj",
            "YWJj/",
            too_long.as_str(),
            control.as_str(),
            not_utf8.as_str(),
        ] {
            assert_eq!(
                PageRequest::<String>::parse(None, Some(bad)),
                Err(PageError::Token),
                "{bad:?}"
            );
        }
        // Ids are digits only.
        for bad in ["abc", "-1", "+1", "18446744073709551616"] {
            let t = URL_SAFE_NO_PAD.encode(bad);
            assert_eq!(
                PageRequest::<u64>::parse(None, Some(&t)),
                Err(PageError::Token),
                "{bad:?}"
            );
        }
        assert_eq!(req(None, Some("")).after, None, "empty: the first page");
    }

    #[test]
    fn a_token_past_the_end_is_an_empty_last_page() {
        let t = encode_token(&"zzz".to_string());
        let p = page(names(5), String::clone, &req(Some("2"), Some(&t)));
        assert_eq!((p.items.len(), p.continue_token), (0, None));
    }

    #[test]
    fn ids_page_in_numeric_order() {
        let ids: Vec<u64> = vec![10, 9, 100, 2, 1_000];
        let r = PageRequest::<u64>::parse(Some("2"), None).unwrap();
        let p = page(ids.clone(), |i| *i, &r);
        assert_eq!(p.items, [2, 9]);
        let r = PageRequest::<u64>::parse(Some("2"), p.continue_token.as_deref()).unwrap();
        let p = page(ids, |i| *i, &r);
        assert_eq!(p.items, [10, 100]);
        assert!(p.continue_token.is_some());
    }
}
