//! Server-rendered HTML: one escape function every rendered value goes through, one page
//! shell, and the security headers every page carries. No template engine and no
//! JavaScript framework: the pages are small, and `format!` with [`escape`] keeps what is
//! rendered visible in review.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// The default policy of every page: nothing loads, inline styles only, forms post back
/// to us, never framed (clickjacking), no `<base>` tricks.
pub const DEFAULT_CSP: &str = "default-src 'none'; style-src 'self' 'unsafe-inline'; \
     form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// HTML-escapes `s` for text content and double- or single-quoted attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:0;background:#f4f5f7;color:#1d1f23}\
main{max-width:26rem;margin:3rem auto;padding:2rem;background:#fff;border-radius:8px;\
box-shadow:0 1px 4px rgba(0,0,0,.15)}h1{font-size:1.4rem;margin-top:0}\
label{display:block;margin:.8rem 0 .2rem;font-weight:600}\
input[type=text],input[type=password]{width:100%;box-sizing:border-box;padding:.5rem;font-size:1rem}\
button{margin-top:1rem;margin-right:.5rem;padding:.5rem 1.2rem;font-size:1rem}\
.error{color:#a40000;background:#fdecea;padding:.6rem;border-radius:4px}\
ul.scopes{padding-left:1.2rem}ul.scopes li{margin:.3rem 0}";

/// A complete page: `title` is escaped here; `body` is already-safe HTML built with
/// [`escape`].
pub fn document(title: &str, body: &str, head_extra: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<meta name=\"referrer\" content=\"no-referrer\"><title>{t}</title><style>{STYLE}</style>{head_extra}</head>\
<body><main><h1>{t}</h1>{body}</main></body></html>\n",
        t = escape(title),
    )
}

/// A page response with the security headers and `csp`.
pub fn page_response(status: StatusCode, html: String, csp: &str) -> Response {
    let mut resp = (status, html).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    security_headers(h, csp);
    resp
}

/// The headers every response of the pages carries, redirects included.
pub fn security_headers(h: &mut axum::http::HeaderMap, csp: &str) {
    let csp = HeaderValue::from_str(csp).unwrap_or(HeaderValue::from_static(DEFAULT_CSP));
    h.insert(header::CONTENT_SECURITY_POLICY, csp);
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
}

/// An error page (never a redirect): the message is escaped, and is always ours (never a
/// caller's string verbatim or an internal cause).
pub fn error_page(status: StatusCode, title: &str, message: &str) -> Response {
    let body = format!(
        "<p class=\"error\" role=\"alert\">{}</p>\
<p>Return to the application you came from and try again.</p>",
        escape(message)
    );
    page_response(status, document(title, &body, ""), DEFAULT_CSP)
}

/// A hidden form field.
pub fn hidden(name: &str, value: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"{}\" value=\"{}\">",
        escape(name),
        escape(value)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            escape(r#"<script>alert("x")</script>&'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#39;"
        );
        assert_eq!(escape("plain é"), "plain é");
        let h = hidden("state", "\"><img src=x onerror=1>");
        assert!(!h.contains("<img"), "{h}");
        assert!(h.contains("&quot;&gt;&lt;img"), "{h}");
    }

    #[test]
    fn pages_carry_security_headers_and_escape_their_title() {
        let r = error_page(StatusCode::BAD_REQUEST, "<b>Bad</b>", "x < y");
        assert_eq!(r.status(), 400);
        let h = r.headers();
        assert_eq!(h[header::CONTENT_SECURITY_POLICY], DEFAULT_CSP);
        assert_eq!(h[header::X_FRAME_OPTIONS], "DENY");
        assert_eq!(h[header::REFERRER_POLICY], "no-referrer");
        assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert_eq!(h[header::CACHE_CONTROL], "no-store");
        assert!(h[header::CONTENT_TYPE].to_str().unwrap().starts_with("text/html"));
        let doc = document("<b>Bad</b>", "", "");
        assert!(doc.contains("&lt;b&gt;Bad&lt;/b&gt;") && !doc.contains("<b>"));
        assert!(doc.contains("<main>") && doc.contains("lang=\"en\""));
    }
}
