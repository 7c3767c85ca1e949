//! Percent-encoding (RFC 3986): a backend's name as one segment of an admin API path, as
//! `loadbalancer ctl` and the statistics page's buttons send it, and the decoding the admin
//! listener applies to it and to form fields.

use std::fmt::Write as _;

/// A backend's name as one segment of the request's path: the host percent-encoded but for the
/// unreserved characters of RFC 3986 section 2.3, then `:` and the port, so that `[::1]:8001`
/// travels as `%5B%3A%3A1%5D:8001` (the form the control API documents) and no name can add a
/// `/` or a `?` to the path.
pub fn encode_name(name: &str) -> String {
    match name.rsplit_once(':') {
        Some((host, port)) => format!("{}:{}", encode(host), encode(port)),
        None => encode(name),
    }
}

/// `text` with every byte but the unreserved characters (letters, digits, `-._~`) as `%XX`.
fn encode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            encoded.push(char::from(byte));
        } else {
            let _ = write!(encoded, "%{byte:02X}");
        }
    }
    encoded
}

/// `%XX` sequences as the bytes they stand for, and `+` as a space (as forms send it); a
/// sequence that is not one is kept as it is.
pub fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_percent_encoded_as_one_encode_name() {
        assert_eq!(encode_name("127.0.0.1:8001"), "127.0.0.1:8001");
        assert_eq!(encode_name("[::1]:8001"), "%5B%3A%3A1%5D:8001");
        assert_eq!(encode_name("app-1.internal_x~:80"), "app-1.internal_x~:80");
        assert_eq!(encode_name("a/b?c#d e%:80"), "a%2Fb%3Fc%23d%20e%25:80");
        assert_eq!(encode_name("é"), "%C3%A9");
    }

    #[test]
    fn what_is_encoded_decodes_back() {
        for name in [
            "127.0.0.1:8001",
            "[::1]:8001",
            "app:8000 (10.0.0.3)",
            "a/b?c#d e%:80",
        ] {
            assert_eq!(decode(&encode_name(name)), name);
        }
        assert_eq!(decode("a+b%zz%4"), "a b%zz%4");
    }
}
