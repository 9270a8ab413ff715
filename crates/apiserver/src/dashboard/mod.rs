//! The web dashboard at `/dashboard/`: a page and its script, compiled into
//! the binary, that read the cluster through the Kubernetes API of the
//! same origin (lists, watches, `pods/log`, `metrics.k8s.io` and
//! `custom.metrics.k8s.io`) with the credentials of whoever opens it.
//!
//! Serving it here, rather than as a separate add-on, means `kubectl proxy`
//! and the kubeconfig's credentials reach it with nothing installed. The
//! page itself holds no data: every figure it shows is a request the
//! reader's RBAC answers, so a tenant's dashboard shows that tenant's
//! namespaces only. It only reads: it sends no write of any kind.
//!
//! The files are served with a Content-Security-Policy that allows only
//! this origin's scripts and styles (no inline script, no other host), so
//! text from the cluster, which the script only ever writes as text, cannot
//! become code in a page that holds API credentials.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// The dashboard's path prefix.
pub const PATH: &str = "/dashboard";

const INDEX: &str = include_str!("index.html");
const SCRIPT: &str = include_str!("app.js");
const STYLE: &str = include_str!("style.css");

const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                      img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
                      frame-ancestors 'none'; form-action 'none'";

/// `GET /dashboard`: to the page, whose relative links need the slash.
pub(crate) async fn redirect() -> Response {
    (
        StatusCode::MOVED_PERMANENTLY,
        [(header::LOCATION, HeaderValue::from_static("/dashboard/"))],
    )
        .into_response()
}

/// `GET /dashboard/` and `GET /dashboard/FILE`.
pub(crate) async fn file(uri: axum::http::Uri) -> Response {
    let name = uri
        .path()
        .strip_prefix(PATH)
        .unwrap_or_default()
        .trim_start_matches('/');
    let (body, content_type) = match name {
        "" | "index.html" => (INDEX, "text/html; charset=utf-8"),
        "app.js" => (SCRIPT, "text/javascript; charset=utf-8"),
        "style.css" => (STYLE, "text/css; charset=utf-8"),
        _ => return (StatusCode::NOT_FOUND, "no such dashboard file\n").into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            // The files change only with the binary; a reload checks.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serves_its_files_with_a_policy_and_nothing_else() {
        for (path, kind) in [
            ("/dashboard/", "text/html"),
            ("/dashboard/index.html", "text/html"),
            ("/dashboard/app.js", "text/javascript"),
            ("/dashboard/style.css", "text/css"),
        ] {
            let r = file(path.parse().unwrap()).await;
            assert_eq!(r.status(), StatusCode::OK, "{path}");
            let h = r.headers();
            assert!(h[header::CONTENT_TYPE].to_str().unwrap().starts_with(kind));
            assert!(
                h[header::CONTENT_SECURITY_POLICY]
                    .to_str()
                    .unwrap()
                    .contains("script-src 'self'")
            );
        }
        for path in [
            "/dashboard/../metrics",
            "/dashboard/secret",
            "/dashboard/app.js/x",
        ] {
            let r = file(path.parse().unwrap()).await;
            assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path}");
        }
    }

    #[test]
    fn the_page_loads_no_inline_script_and_no_other_host() {
        // The policy forbids both; the page must not need them.
        assert!(!INDEX.contains("<script>"), "inline script in index.html");
        for page in [INDEX, SCRIPT, STYLE] {
            // SVG's namespace is a name, not a place the page goes.
            let page = page.replace("http://www.w3.org/2000/svg", "");
            assert!(!page.contains("http://") && !page.contains("https://"));
        }
        // The script writes cluster text as text, never as markup.
        assert!(!SCRIPT.contains("innerHTML") && !SCRIPT.contains("insertAdjacentHTML"));
    }
}
