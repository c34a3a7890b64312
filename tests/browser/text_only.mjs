// Loads castellum's admin console in Debian's headless Chromium after a client has put HTML into
// the audit log, and reports what the page made of it: whether the markup became elements or
// stayed text, whether its handler ran, and whether the page's Content-Security-Policy lets an
// inline script run. Usage: node text_only.mjs ADMIN_URL TOKEN PAYLOAD
import { chromium } from "playwright-core";

const [, , base, token, payload] = process.argv;
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage();
  const errors = [];
  const dialogs = [];
  const cspViolations = [];
  page.on("pageerror", (e) => errors.push(e.message));
  page.on("dialog", (d) => { dialogs.push(d.message()); d.dismiss(); });
  page.on("console", (m) => { if (m.text().includes("Content Security Policy")) cspViolations.push(m.text()); });
  await page.goto(`${base}/admin`);
  await page.fill("#token", token);
  await page.click("#sign-in");
  // The audit table shows the client's refused request (whose profile name is the payload).
  await page.waitForFunction(() => [...document.querySelectorAll("#audit td")].some((td) => td.textContent === "unknown-profile"),
    null, { timeout: 10000 });
  await page.waitForTimeout(1200); // one more refresh: the rows are rebuilt from the same data
  const audit = await page.evaluate(() => {
    const table = document.getElementById("audit");
    return {
      elements: table.querySelectorAll("img, script, svg, iframe, object").length,
      cells_with_payload: [...table.querySelectorAll("td")].filter((td) => td.textContent.includes("<img")).length,
      everywhere: document.querySelectorAll("img").length,
    };
  });
  const handlerRan = await page.evaluate(() => window.__castellum_xss === 1);
  // An inline script injected into the page: the CSP must stop it.
  let inlineRefused = "";
  await page.addScriptTag({ content: "window.__castellum_inline = 1;" }).catch((e) => { inlineRefused = e.message; });
  const inlineRan = await page.evaluate(() => window.__castellum_inline === 1);
  console.log(JSON.stringify({ audit, handlerRan, inlineRan, inlineRefused, cspViolations, dialogs, errors }));
} finally {
  await browser.close();
}
