//! The admin console's two defences against what clients can write into the data it shows (the
//! audit log records a refused request's profile name as sent): a Content-Security-Policy that
//! allows no inline script, and data inserted as text only. Judged from the HTTP response, the
//! served files, and a real headless Chromium.

mod common;

use std::collections::HashMap;

use common::*;

/// A client-chosen string that becomes an element with a running handler if inserted as HTML.
const PAYLOAD: &str = "<img src=x onerror=window.__castellum_xss=1>";

/// The CSP's directives: name -> sources.
fn directives(csp: &str) -> HashMap<String, Vec<String>> {
    csp.split(';')
        .filter_map(|d| {
            let mut words = d.split_whitespace();
            let name = words.next()?.to_ascii_lowercase();
            Some((name, words.map(str::to_string).collect()))
        })
        .collect()
}

#[actix_rt::test]
async fn the_console_forbids_inline_script_and_serves_no_inline_code() {
    let db = TestDb::sqlite();
    let server = TestServer::start(dev_config(&db)).await;
    for path in ["/admin", "/admin/console.js"] {
        let resp = server.http.get(format!("{}{path}", server.admin_base)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        let csp = resp.headers()["content-security-policy"].to_str().unwrap().to_string();
        let d = directives(&csp);
        // Scripts come from this origin only: no inline code, no eval, no other source.
        let scripts = d.get("script-src").or_else(|| d.get("default-src")).expect("a script policy");
        assert_eq!(scripts, &["'self'".to_string()], "{path}: {csp}");
        assert_eq!(d.get("default-src"), Some(&vec!["'self'".to_string()]), "{csp}");
        assert_eq!(d.get("frame-ancestors"), Some(&vec!["'none'".to_string()]), "{csp}");
        assert!(!csp.contains("unsafe-eval") && !d.contains_key("script-src-attr"), "{csp}");
        if path == "/admin" {
            assert_eq!(resp.headers()["x-frame-options"], "DENY");
            let html = resp.text().await.unwrap();
            // Every script is a file of this origin; no handler attributes.
            let scripts = html.matches("<script").count();
            assert!(scripts >= 1, "{html}");
            assert_eq!(html.matches("<script src=\"/admin/console.js\"></script>").count(), scripts, "inline script");
            let lower = html.to_ascii_lowercase();
            for handler in [" onclick=", " onload=", " onerror=", " onsubmit=", "javascript:"] {
                assert!(!lower.contains(handler), "{handler} in the console page");
            }
        } else {
            // The script never hands data to an HTML parser or to eval.
            let js = resp.text().await.unwrap();
            for sink in
                ["innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function", ".html("]
            {
                assert!(!js.contains(sink), "console.js uses {sink}");
            }
            assert!(js.contains("createTextNode") && js.contains("textContent"), "it inserts text");
        }
    }
    server.stop().await;
}

/// A client puts HTML in the audit log (a refused request whose profile name is markup); the
/// console in Chromium shows it as text — no element, no handler run — and the page's CSP stops
/// an inline script injected into it.
#[actix_rt::test]
async fn the_console_shows_client_supplied_html_as_text_in_a_browser() {
    browser_dir();
    let db = TestDb::sqlite();
    let mut config = dev_config(&db);
    config.audit.refusal_interval = std::time::Duration::from_millis(100);
    let server = TestServer::start(config).await;
    let refused = server.issue(DEMO_KEY, PAYLOAD, &csr(Key::P256, &["xss.example.test"])).send().await.unwrap();
    assert_eq!(refused.status(), 404, "an unknown profile");
    // The audit log holds the markup as sent, in the refusal tally's example (written at the
    // tally's next interval).
    let started = std::time::Instant::now();
    while sql::count(&db, &format!("SELECT count(*) AS n FROM audit_log WHERE detail LIKE '%{PAYLOAD}%'")) != 1 {
        assert!(started.elapsed() < std::time::Duration::from_secs(5), "the refusal is not in the audit log");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    let args = [server.admin_base.as_str(), ADMIN_TOKEN, PAYLOAD].map(std::ffi::OsString::from).to_vec();
    let seen = run_browser_script("text_only.mjs", args).await;
    assert_eq!(seen["audit"]["elements"], 0, "the markup became elements: {seen}");
    assert_eq!(seen["audit"]["everywhere"], 0, "{seen}");
    assert!(seen["audit"]["cells_with_payload"].as_u64().unwrap() >= 1, "shown as text: {seen}");
    assert_eq!(seen["handlerRan"], false, "{seen}");
    assert_eq!(seen["inlineRan"], false, "the CSP let an inline script run: {seen}");
    assert_eq!(seen["dialogs"], serde_json::json!([]), "{seen}");
    assert_eq!(seen["errors"], serde_json::json!([]), "{seen}");
    server.stop().await;
}
